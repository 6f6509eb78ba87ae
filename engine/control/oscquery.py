"""OSCQuery: an HTTP endpoint describing every OSC address, its type, range and current value; LISTEN."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from bridges.ratelimit import RateLimitedLog
from bridges.serving import DROPPED_CLIENT_ERRORS, Handler, clip, guarded
from bridges.webguard import foreign_origin, parse_allow, refusal
from bridges.webserver import WebServer
from engine import params
from engine.control.dispatch import osc_args
from engine.control.transport import build_message
from engine.params import ParamKind, ParamSpec

logger = logging.getLogger(__name__)

ACCESS_NONE, ACCESS_READ, ACCESS_WRITE, ACCESS_READ_WRITE = 0, 1, 2, 3
ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "ACCESS", "VALUE", "RANGE", "DESCRIPTION", "CLIPMODE")


def type_tags(spec: ParamSpec, value: Any) -> str:
    """The OSC type-tag string of a parameter (for lists: of its current value)."""
    kind = spec.kind
    if kind is ParamKind.FLOAT:
        return "f"
    if kind is ParamKind.INT:
        return "i"
    if kind is ParamKind.BOOL:
        return "T"
    if kind in (ParamKind.STRING, ParamKind.ENUM):
        return "s"
    if kind is ParamKind.INT_LIST:
        return "i" * max(1, len(value or [0]))
    if kind is ParamKind.FLOAT_LIST:
        return "f" * max(1, len(value or [0]))
    if kind is ParamKind.SIZE:
        return "ii"
    if kind is ParamKind.PROMPT_BLEND:
        return "sf" * max(1, len(value or [None]))
    if kind is ParamKind.SEED_BLEND:
        return "if" * max(1, len(value or [None]))
    return "s" if spec.osc_args else ""


def _range(spec: ParamSpec) -> list[dict[str, Any]] | None:
    if spec.kind is ParamKind.ENUM:
        return [{"VALS": list(spec.choices)}]
    if spec.kind is ParamKind.BOOL:
        return [{"VALS": [False, True]}]
    if spec.minimum is None and spec.maximum is None:
        return None
    entry = {"MIN": spec.minimum, "MAX": spec.maximum}
    if spec.kind in (ParamKind.INT_LIST, ParamKind.FLOAT_LIST, ParamKind.SIZE):
        return [entry] * len(type_tags(spec, params.REGISTRY[spec.name].default))
    return [entry]


def build_namespace(
    values: Mapping[str, Any],
    engine: Mapping[str, Any],
    osc_host: str,
    osc_port: int,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole OSCQuery tree (root node) from the registry and current values; ``sources``: the
    names the source-switching addresses take (their RANGE VALS: a menu in TouchDesigner)."""
    root: dict[str, Any] = {
        "FULL_PATH": "/",
        "ACCESS": ACCESS_NONE,
        "DESCRIPTION": "latentstage",
        "CONTENTS": {},
    }

    def insert(path: str, node: dict[str, Any]) -> None:
        parts = [p for p in path.split("/") if p]
        parent = root
        for depth, part in enumerate(parts[:-1]):
            full = "/" + "/".join(parts[: depth + 1])
            parent = parent["CONTENTS"].setdefault(
                part, {"FULL_PATH": full, "ACCESS": ACCESS_NONE, "CONTENTS": {}}
            )
            parent.setdefault("CONTENTS", {})  # a method with children (/quantize, /quantize/offset_ms)
        existing = parent["CONTENTS"].get(parts[-1])
        if existing is not None and "CONTENTS" in existing:  # its children came first
            node = {**node, "CONTENTS": existing["CONTENTS"]}
        parent["CONTENTS"][parts[-1]] = node

    for spec in params.REGISTRY.values():
        value = values.get(spec.name)
        for address in spec.addresses:
            node: dict[str, Any] = {
                "FULL_PATH": address,
                "TYPE": type_tags(spec, value),
                "ACCESS": ACCESS_WRITE if spec.kind is ParamKind.ACTION else ACCESS_READ_WRITE,
                "DESCRIPTION": spec.doc
                + ("" if address == spec.osc_address else f" (alias of {spec.osc_address})"),
            }
            if spec.kind is not ParamKind.ACTION and value is not None:
                node["VALUE"] = osc_args(spec, value)
            span = _range(spec)
            if spec.pattern is not None and spec.pattern_text == params.SOURCE_NAME_TEXT and sources:
                span = [{"VALS": list(sources)}]
            if span is not None:
                node["RANGE"] = span
                if spec.minimum is not None:
                    node["CLIPMODE"] = "both"
            insert(address, node)
    for status in params.STATUS:
        node = {
            "FULL_PATH": status.address,
            "TYPE": status.tag,
            "ACCESS": ACCESS_READ,
            "DESCRIPTION": status.doc,
        }
        if engine.get(status.name) is not None:
            node["VALUE"] = [engine[status.name]]
        insert(status.address, node)
    for spec in params.REGISTRY.values():  # the modulated values, sent while a modulator moves one
        if params.modulatable(spec):
            address = params.modulated_address(spec.name)
            insert(
                address,
                {
                    "FULL_PATH": address,
                    "TYPE": type_tags(spec, values.get(spec.name)),
                    "ACCESS": ACCESS_READ,
                    "DESCRIPTION": f"{spec.osc_address} as modulated (base + modulators, clamped)",
                },
            )
    return root


def host_info(osc_host: str, osc_port: int) -> dict[str, Any]:
    return {
        "NAME": "latentstage",
        "EXTENSIONS": {
            "ACCESS": True,
            "VALUE": True,
            "RANGE": True,
            "DESCRIPTION": True,
            "CLIPMODE": True,
            "TAGS": False,
            "UNIT": False,
            "CRITICAL": False,
            "LISTEN": True,
            "PATH_CHANGED": False,
        },
        "OSC_IP": osc_host,
        "OSC_PORT": osc_port,
        "OSC_TRANSPORT": "UDP",
    }


def find_node(root: dict[str, Any], path: str) -> dict[str, Any] | None:
    node = root
    for part in [p for p in path.split("/") if p]:
        contents = node.get("CONTENTS")
        if not contents or part not in contents:
            return None
        node = contents[part]
    return node


#: Paths one websocket may LISTEN to at once, and the OSC messages it may have queued (a slow
#: client loses the oldest, it never holds the engine's memory).
MAX_LISTENS = 1024
_QUEUE_LENGTH = 256
_MAX_COMMAND_BYTES = 4096
_COMMAND_RULE = 'allowed: {"COMMAND": "LISTEN" or "IGNORE", "DATA": "/address"} as a text message'


@dataclass
class _Listener:
    """One websocket's LISTEN set and its outgoing OSC messages."""

    client: str
    paths: set[str] = field(default_factory=set)
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(_QUEUE_LENGTH))

    def offer(self, data: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: the newest value is what matters
        self.queue.put_nowait(data)


class OscQueryServer:
    """Serves the namespace over HTTP on ``host:port`` and OSCQuery's ``LISTEN`` / ``IGNORE``
    over a websocket on the same port; aiohttp on a thread of its own (``bridges.webserver``).

    A websocket client sends text ``{"COMMAND": "LISTEN", "DATA": "/guidance_scale"}`` and then
    gets every applied change of that address as a binary OSC message (``changed`` hands them
    over from the control service's change feed); ``IGNORE`` stops it. The upgrade passes the
    same checks as the operator page: a ``Host`` of this machine, no foreign ``Origin``, and a
    client in ``allow`` when bound beyond this machine. ``close()`` is safe twice.
    """

    def __init__(
        self,
        values: Callable[[], Mapping[str, Any]],
        engine: Callable[[], Mapping[str, Any]],
        osc_host: str,
        osc_port: int,
        host: str = "127.0.0.1",
        port: int = 9002,
        allow: Sequence[str] = (),
        sources: Callable[[], list[str]] = list,
    ) -> None:
        self._values, self._engine = values, engine
        self._sources = sources
        self.osc_host, self.osc_port = osc_host, osc_port
        self._allow = parse_allow(allow, "osc")
        self._log = RateLimitedLog(logger, 1.0)  # failures: a client must not fill the disk
        self._listeners: dict[web.WebSocketResponse, _Listener] = {}  # on the server's loop only
        self._web = WebServer("oscquery")
        app = web.Application(middlewares=[self._boundary], client_max_size=_MAX_COMMAND_BYTES)
        app.router.add_route("*", "/{path:.*}", self._route)
        app.on_shutdown.append(self._on_shutdown)
        try:
            self.port = self._web.listen(app, host, port)
        except OSError as err:
            raise OSError(f"OSCQuery cannot listen on {host}:{port} ({err.strerror})") from err
        self._started = False

    def start(self) -> None:
        self._web.start()
        self._started = True
        logger.info("OSCQuery on http://127.0.0.1:%s/", self.port)

    def respond(self, raw_path: str) -> tuple[int, Any]:
        """(status, JSON body) for a request path such as ``/prompt?VALUE``."""
        parts = urlsplit(raw_path)
        path, query = unquote(parts.path) or "/", parts.query
        if query == "HOST_INFO":
            return HTTPStatus.OK, host_info(self.osc_host, self.osc_port)
        root = build_namespace(self._values(), self._engine(), self.osc_host, self.osc_port, self._sources())
        node = find_node(root, path)
        if node is None:
            return HTTPStatus.NOT_FOUND, {"error": f"no OSC node at {path}"}
        if not query:
            return HTTPStatus.OK, node
        if query not in ATTRIBUTES:
            return HTTPStatus.BAD_REQUEST, {"error": f"unsupported attribute {query}"}
        if query not in node:
            return HTTPStatus.NO_CONTENT, None
        return HTTPStatus.OK, {query: node[query]}

    def changed(self, values: Mapping[str, Any]) -> None:
        """Applied values changed (called from the change feed's thread): the websockets that
        LISTEN to their addresses get each as a binary OSC message."""
        if not self._listeners:
            return
        packets: dict[str, bytes] = {}
        for name, value in values.items():
            spec = params.REGISTRY.get(name)
            if spec is None or value is None or spec.kind is ParamKind.ACTION:
                continue
            args = osc_args(spec, value)
            for address in spec.addresses:
                packets[address] = build_message(address, args)
        if packets:
            self._web.call(self._deliver, packets)

    def close(self) -> None:
        self._web.close()

    # ------------------------------------------------------------------ on the server's loop
    def _deliver(self, packets: Mapping[str, bytes]) -> None:
        for listener in self._listeners.values():
            for address in listener.paths & packets.keys():
                listener.offer(packets[address])

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self._listeners):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the engine is stopping")

    @web.middleware
    async def _boundary(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One request: a client gone is a DEBUG line, any failure a 500 and a rate-limited line."""
        return await guarded(request, handler, "OSCQuery", self._log, ("GET",), _failure_reply)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return _json(
                HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{request.method} not supported; allowed: GET"}
            )
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        loop = asyncio.get_running_loop()
        status, body = await loop.run_in_executor(None, self.respond, request.raw_path)
        return _json(status, body)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """OSCQuery's websocket: LISTEN / IGNORE in, binary OSC messages out."""
        client = request.remote or ""
        refused = refusal(request.headers, client, self._allow)
        origin = foreign_origin(request.headers)
        if refused is None and origin is not None:
            refused = "origin", f"cross-origin websocket from {origin[:100]!r} refused"
        if refused is not None:
            kind, why = refused
            self._log(
                logging.WARNING, f"refused:{kind}", "OSCQuery websocket from %s refused: %s", client, why
            )
            return web.Response(status=HTTPStatus.FORBIDDEN, text=f"{why}\n")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=_MAX_COMMAND_BYTES)
        await ws.prepare(request)
        listener = _Listener(client)
        self._listeners[ws] = listener
        sender = asyncio.create_task(self._send(ws, listener))
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    self._command(listener, message.data)
                else:
                    self._bad(listener, f"a {message.type.name.lower()} message")
        finally:
            del self._listeners[ws]
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        return ws

    async def _send(self, ws: web.WebSocketResponse, listener: _Listener) -> None:
        try:
            while not ws.closed:
                await ws.send_bytes(await listener.queue.get())
        except DROPPED_CLIENT_ERRORS as err:
            logger.debug("oscquery client %s went away: %s", listener.client, err)

    def _command(self, listener: _Listener, text: str) -> None:
        """One ``{"COMMAND": ..., "DATA": ...}``; a bad one is logged (a line a second) and ignored."""
        try:
            command = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            self._bad(listener, f"{clip(text, 100)!r} (not JSON)")
            return
        if not isinstance(command, dict) or command.get("COMMAND") not in ("LISTEN", "IGNORE"):
            self._bad(listener, clip(text, 100))
            return
        path = command.get("DATA")
        if not isinstance(path, str) or path not in params.BY_ADDRESS:
            self._bad(listener, f"DATA {clip(str(path), 100)!r}: not a parameter's OSC address")
            return
        if command["COMMAND"] == "IGNORE":
            listener.paths.discard(path)
        elif len(listener.paths) < MAX_LISTENS:
            listener.paths.add(path)
        else:
            self._bad(listener, f"LISTEN {path}: already {MAX_LISTENS} paths")

    def _bad(self, listener: _Listener, what: str) -> None:
        message = "OSCQuery websocket from %s: ignored %s; %s"
        self._log(logging.WARNING, "bad-command", message, listener.client, what, _COMMAND_RULE)


def _failure_reply(message: str, failed: bool) -> web.Response:
    return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})


def _json(status: int, body: Any) -> web.Response:
    data = json.dumps(body).encode() if body is not None else b""
    return web.Response(status=status, body=data, headers={"Content-Type": "application/json"})
