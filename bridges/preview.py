"""Preview sink: an HTTP page with the live output as MJPEG and the engine's stats; with an operator,
the operator page (input and output, every live parameter, scenes, a plot of fps and latency)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import importlib.util
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from aiohttp import WSCloseCode, web

from bridges.base import BridgeError, BridgeUnavailable, Closing, Frame
from bridges.ratelimit import RateLimitedLog
from bridges.serving import DROPPED_CLIENT_ERRORS, Handler, guarded, report_failure
from bridges.webassets import StaticFiles
from bridges.webguard import client_allowed, cross_site, foreign_origin, is_loopback, parse_allow, refusal
from bridges.webserver import WebServer

__all__ = ["MAX_JSON_DEPTH", "MAX_REQUEST_BYTES", "OperatorApi", "PreviewSink", "is_loopback"]

logger = logging.getLogger(__name__)

BOUNDARY = "frame"
MAX_REQUEST_BYTES = 64 * 1024  # a parameter change; prompts are at most 2000 characters
#: How deep ``[`` and ``{`` may nest in a request body. The API's deepest body is 3 levels
#: (``{"name": "prompt_blend", "value": [["a", 1.0], ...]}``); 16 leaves room for any change to the
#: API and stays far below the depth at which ``json.loads`` recurses out of the stack.
MAX_JSON_DEPTH = 16
#: The plain page's files (``bridges/static``); the operator page's come with the operator.
PREVIEW_PAGE = StaticFiles(
    Path(__file__).with_name("static"),
    {"/preview": "preview.html", "/preview.js": "preview.js", "/preview.css": "preview.css"},
)


class OperatorApi(Protocol):
    """What the operator page reads and writes (``engine.control.operator.Operator``).

    ``apply`` validates exactly as OSC does and returns ``(accepted, JSON body)``; the reads
    raise ``RuntimeError`` while the engine's control service is not running yet. ``page`` holds
    the page's files (``/`` is its HTML). ``subscribe(listener)`` calls ``listener()`` (from the
    operator's threads, so it must not block) whenever the state or the status changed; it
    returns the function that unsubscribes. ``history(since)`` holds the samples after ``since``.
    ``thumbnail(name)`` is a small JPEG of the source ``name`` (``None``: no frame came in time;
    ``ValueError``: not a source name here; ``LookupError``: no thumbnails in this engine); it
    may block for about a second, so the preview calls it on an executor of its own.
    """

    page: StaticFiles

    def spec(self) -> Mapping[str, Any]: ...

    def state(self) -> Mapping[str, Any]: ...

    def history(self, since: float | None = None) -> Mapping[str, Any]: ...

    def apply(self, name: Any, value: Any, client: str) -> tuple[bool, Mapping[str, Any]]: ...

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]: ...

    def thumbnail(self, name: str) -> bytes | None: ...


_LOG_INTERVAL_S = 1.0  # a failure or refusal that repeats is logged at most this often (per kind)
_PUSH_INTERVAL_S = 0.05  # the page's websocket gets at most this many pushes a second
_THUMBNAIL_THREADS = 4  # thumbnails wait up to a second each: on threads of their own
MAX_SOURCE_NAME = 1000  # a thumbnail's ?name= longer than this is refused unread
_NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
}

# A JSON string (escapes included; one left open runs to the end of the text), and what is left.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = np.zeros(256, dtype=np.int64)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


class JsonTooDeep(ValueError):
    """A request body nested deeper than ``MAX_JSON_DEPTH``; its text says how deep and what is allowed."""


def json_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in JSON ``text``; brackets inside strings (escaped quotes
    included) do not count, stray closing brackets never make it negative. No recursion, and a
    few milliseconds for the largest body (the scan runs in ``re`` and numpy, not per character)."""
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    levels = np.cumsum(_BRACKET_STEP[np.frombuffer(brackets, dtype=np.uint8)])
    floors = np.minimum.accumulate(np.minimum(levels, 0))  # how far stray closers went below 0
    return int((levels - floors).max())


def json_depth_error(text: str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """What is wrong with JSON ``text`` nested deeper than ``limit`` (``None`` when it is not)."""
    depth = json_depth(text)
    if depth <= limit:
        return None
    return f"bad request: JSON nested {depth} deep; allowed: at most {limit} levels of [ ] and {{ }}"


def parse_json_body(raw: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """A request body parsed as ``json.loads`` parses bytes (UTF-8, -16 or -32), after refusing
    nesting deeper than ``limit`` (the parser recurses once per level: a deep body would exhaust
    the stack). Raises ``JsonTooDeep``, or ``ValueError`` for anything else that is not JSON."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    problem = json_depth_error(text, limit)
    if problem is not None:
        raise JsonTooDeep(problem)
    try:
        return json.loads(text)
    except RecursionError as err:  # not below the limit; kept so that no body can crash a request
        raise JsonTooDeep(f"bad request: JSON nested too deep; allowed: at most {limit} levels") from err


def unavailable_reason() -> str | None:
    """Why the preview cannot run here (``None`` when it can: it needs only Pillow)."""
    if importlib.util.find_spec("PIL") is None:
        return "the preview needs Pillow to encode JPEG; install it with `pip install Pillow`"
    return None


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """RGBA (or RGB) ``(h, w, 4|3)`` uint8 → JPEG bytes (alpha is dropped)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[..., :3])).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    """Stats values as strict JSON: NaN/inf → null, numpy scalars → numbers, the rest → str."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _reply(status: int, content_type: str, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": content_type, **_NO_CACHE})


def _json(status: int, body: Any) -> web.Response:
    return _reply(status, "application/json", json.dumps(body, allow_nan=False).encode())


def _failure_reply(message: str, failed: bool) -> web.Response:
    """The preview's 500: JSON naming the error (the page shows it); plain text for a client gone."""
    if not failed:
        return _text(HTTPStatus.INTERNAL_SERVER_ERROR, f"{message}\n")
    body = {"ok": False, "error": f"{message}; the engine's log has the details"}
    return _json(HTTPStatus.INTERNAL_SERVER_ERROR, body)


def _text(status: int, text: str) -> web.Response:
    return _reply(status, "text/plain; charset=utf-8", text.encode())


class PreviewSink(Closing):
    """A ``FrameSink`` that serves the live output to a browser at ``http://host:port/``.

    Pages: ``/`` (the output and a stats line), ``/stream.mjpg`` (MJPEG, newest frame only,
    at most ``max_fps`` per client; a slow client misses frames instead of building a
    backlog), ``/frame.jpg`` (the latest frame; 503 before the first), ``/stats.json``
    (``stats()`` plus ``frames_sent`` and ``clients``).

    ``send`` only stores a reference to the frame and wakes the clients, so it must not be
    modified afterwards; JPEG encoding happens once per new frame on the server's executor, and
    only when a client asks. After ``close`` (safe to call twice) ``send`` is a no-op, so a
    runtime that is shutting down never sees an error from here.

    With an ``operator`` (``OperatorApi``) ``/`` is the operator page instead (the plain page
    stays at ``/preview``): input (``/input.mjpg``, from ``send_input``) and output side by side,
    every live parameter, scenes, the state and a plot; ``/api/spec``, ``/api/state``,
    ``/api/history`` read, ``POST /api/param`` writes through the operator and the websocket
    ``/api/ws`` pushes the state, the status and new plot samples as they change;
    ``/api/source-thumbnail?name=NAME`` is a small JPEG of a source (the page's Sources box).
    Bound beyond this machine, only clients in ``allow`` (addresses or networks, as ``osc.allow``)
    are served.

    The server is aiohttp on a thread of its own (``bridges.webserver``). Raises ``BridgeError``
    when ``host:port`` cannot be bound (e.g. the port is in use), and ``ValueError`` for a host
    beyond this machine without an ``allow`` list or a bad entry in it. ``port=0`` picks a free
    port; the one chosen is ``.port`` and the page is ``.url``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        stats: Callable[[], Mapping[str, Any]] | None = None,
        jpeg_quality: int = 80,
        max_fps: float = 30.0,
        operator: OperatorApi | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise BridgeUnavailable(reason)
        if not 0 <= port <= 65535:
            raise ValueError(f"preview port must be 0..65535 (0 = any free port), got {port}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"preview jpeg_quality must be 1..100, got {jpeg_quality}")
        if not max_fps > 0 or not math.isfinite(max_fps):
            raise ValueError(f"preview max_fps must be a positive number, got {max_fps}")
        self._allow = parse_allow(allow, "preview")
        if not is_loopback(host) and host != "localhost" and not self._allow:
            raise ValueError(
                f"preview host {host!r} is reachable from other machines: give the addresses allowed "
                "to see and steer it (osc.allow, e.g. [192.168.1.0/24]), or use host 127.0.0.1"
            )
        self._operator = operator
        self._stats = stats
        self._quality = int(jpeg_quality)
        self._min_interval = 1.0 / float(max_fps)
        self._log = RateLimitedLog(logger, _LOG_INTERVAL_S)  # failures, refusals: no client fills the disk

        self._cond = threading.Condition()  # guards frame, version, counters, closed
        self._frame: Frame | None = None
        self._version = 0  # our own counter: Frame.sequence may repeat or restart
        self._frames_sent = 0
        self._clients = 0
        self._encode_lock = threading.Lock()  # one encoder at a time; guards the cache
        self._jpeg: tuple[int, bytes] | None = None
        self._source: Frame | None = None  # the newest input frame (the operator page shows it)
        self._source_version = 0
        self._source_jpeg: tuple[int, bytes] | None = None
        # On the server's loop only: set (and replaced) when a newer frame arrives; the page
        # websockets' wake-ups and the sockets themselves (closed on shutdown).
        self._frames_ready = asyncio.Event()
        self._page_wakes: set[asyncio.Event] = set()
        self._sockets: set[web.WebSocketResponse] = set()
        self._thumbnails: concurrent.futures.ThreadPoolExecutor | None = None  # made at the first ask

        self._web = WebServer(f"preview-{port}")
        app = web.Application(middlewares=[self._boundary], client_max_size=MAX_REQUEST_BYTES + 1)
        app.router.add_route("*", "/{path:.*}", self._route)
        app.on_shutdown.append(self._on_shutdown)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._web.listen(app, host, port)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                other = port + 1 if 0 < port < 65535 else 8081
                raise BridgeError(
                    f"cannot serve the preview on {where}: the port is in use (another "
                    f"latentstage or another program); choose another port, e.g. "
                    f"`outputs: [{{type: preview, port: {other}}}]`"
                ) from error
            raise BridgeError(f"cannot serve the preview on {where}: {error}") from error
        self._web.start()
        self._unsubscribe = operator.subscribe(self._operator_changed) if operator is not None else None
        bound_host = self._web.bound_host()
        self.host = host
        self.url = f"http://{self._url_host(bound_host)}:{self.port}/"
        if is_loopback(bound_host):
            logger.info("preview at %s", self.url)
        else:
            logger.warning(
                "preview bound to %s:%d is visible on the network: anyone who can reach this "
                "machine can watch the output (use host 127.0.0.1 to keep it local)",
                host,
                self.port,
            )

    @staticmethod
    def _url_host(bound: str) -> str:
        if bound in ("0.0.0.0", ""):
            return "127.0.0.1"
        if bound == "::":
            return "[::1]"
        return f"[{bound}]" if ":" in bound else bound

    # -- FrameSink -------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Make ``frame`` the newest one (cheap: no copy, no encoding). No-op after close."""
        with self._cond:
            if self._closed:
                return
            self._frame = frame
            self._version += 1
            self._frames_sent += 1
            watched = self._clients > 0
        if watched:
            self._web.call(self._wake_streams)

    def send_input(self, frame: Frame) -> None:
        """Make ``frame`` the newest input frame (``/input.mjpg``); cheap, like ``send``."""
        with self._cond:
            if self._closed:
                return
            self._source = frame
            self._source_version += 1
            watched = self._clients > 0
        if watched:
            self._web.call(self._wake_streams)

    def _release(self) -> None:
        """Stop serving, end the streams and the websockets and release the port."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._web.call(self._wake_streams)  # the streams see ``_closed`` and end
        self._web.close()
        if self._thumbnails is not None:
            self._thumbnails.shutdown(wait=False, cancel_futures=True)
        self._jpeg = self._source_jpeg = None
        logger.debug("preview on port %d closed", self.port)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- on the server's loop --------------------------------------------------------------

    def _wake_streams(self) -> None:
        self._frames_ready.set()
        self._frames_ready = asyncio.Event()

    def _operator_changed(self) -> None:
        """The operator's state or status changed (called from its threads): wake the pages."""
        self._web.call(self._wake_pages)

    def _wake_pages(self) -> None:
        for wake in self._page_wakes:
            wake.set()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._wake_streams()
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the engine is stopping")

    @web.middleware
    async def _boundary(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse what must be refused, then run one request: a client that went away is a DEBUG
        line; anything else is a 500 and one rate-limited line."""
        client = request.remote or ""
        refused = refusal(request.headers, client, self._allow)
        if refused is not None:
            kind, why = refused  # a scan of the network must not fill the disk either
            self._log(logging.WARNING, f"refused:{kind}", "preview request from %s refused: %s", client, why)
            return _text(HTTPStatus.FORBIDDEN, f"{why}\n")
        return await guarded(request, handler, "preview", self._log, ("GET", "POST"), _failure_reply)

    def _failed(self, what: str, error: BaseException | None, where: str) -> None:
        """``bridges.serving.report_failure``: a line a second per ``where`` and kind of failure."""
        report_failure(self._log, "preview", what, error, where)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return await self._post(request)
        if request.method != "GET":
            return _text(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} not served; allowed: GET and POST\n"
            )
        path = request.path
        operator = self._operator
        if operator is not None and path in ("/", "/index.html"):
            return operator.page.response("/", request.headers.get("If-None-Match"))
        if operator is not None and path != "/" and path in operator.page:
            return operator.page.response(path, request.headers.get("If-None-Match"))
        if path in ("/", "/index.html"):
            path = "/preview"
        if path in PREVIEW_PAGE:
            return PREVIEW_PAGE.response(path, request.headers.get("If-None-Match"))
        if path == "/stream.mjpg":
            return await self._stream(request)
        if path == "/input.mjpg":
            return await self._stream(request, source=True)
        if path == "/api/ws" and operator is not None:
            return await self._page_socket(request, operator)
        if path == "/api/source-thumbnail":
            return await self._thumbnail(request)
        if path in ("/api/spec", "/api/state", "/api/history"):
            return await self._api_get(path.removeprefix("/api/"))
        if path == "/frame.jpg":
            latest = await asyncio.get_running_loop().run_in_executor(None, self._latest_jpeg, False)
            if latest is None:
                return _text(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet\n")
            return _reply(HTTPStatus.OK, "image/jpeg", latest[1])
        if path == "/stats.json":
            return _json(HTTPStatus.OK, self._stats_snapshot())
        return _text(HTTPStatus.NOT_FOUND, "not found\n")

    async def _post(self, request: web.Request) -> web.Response:
        """``/api/param``: one change ``{"name": ..., "value": ...}`` through the OSC validation."""
        operator = self._operator
        if request.path != "/api/param" or operator is None:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "not found"})
        refused = self._write_refusal(request)
        if refused is not None:
            return _json(refused[0], {"ok": False, "error": refused[1]})
        allowed = f'a JSON object {{"name": ..., "value": ...}} of at most {MAX_REQUEST_BYTES} bytes'
        error = f"bad request; allowed: {allowed}"
        body = None
        length = request.content_length or 0
        if 0 < length <= MAX_REQUEST_BYTES:
            try:
                body = parse_json_body(await request.read())
            except JsonTooDeep as err:
                error = str(err)
            except ValueError:  # not text, not JSON (UnicodeDecodeError is a ValueError)
                body = None
        if not isinstance(body, dict) or "name" not in body or "value" not in body:
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": error})
        loop = asyncio.get_running_loop()
        try:
            accepted, reply = await loop.run_in_executor(
                None, operator.apply, body["name"], body["value"], request.remote or ""
            )
        except RuntimeError as err:  # the control service is not up yet
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(err)})
        return _json(HTTPStatus.OK if accepted else HTTPStatus.BAD_REQUEST, dict(reply))

    @staticmethod
    def _write_refusal(request: web.Request) -> tuple[HTTPStatus, str] | None:
        """Writes come from the page itself: same origin (a browser sends ``Origin`` with every
        cross-site POST) and a JSON body (a form or ``no-cors`` request cannot send one)."""
        origin = foreign_origin(request.headers)
        if origin is not None:
            return HTTPStatus.FORBIDDEN, f"cross-origin write from {origin[:100]!r} refused"
        if (request.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "writes must be Content-Type: application/json"
        return None

    async def _api_get(self, what: str) -> web.Response:
        operator = self._operator
        if operator is None:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "this preview has no operator page"})
        read = {"spec": operator.spec, "state": operator.state, "history": operator.history}[what]
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, read)
        except RuntimeError as err:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(err)})
        return _json(HTTPStatus.OK, _jsonable(body))

    async def _thumbnail(self, request: web.Request) -> web.Response:
        """``/api/source-thumbnail?name=NAME``: a small JPEG of a source (204: no frame came in
        time). It may open the source, so only the page itself may ask (``cross_site``); the
        operator's call blocks up to about a second, on this sink's own threads."""
        operator = self._operator
        if operator is None:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "this preview has no operator page"})
        why = cross_site(request.headers)
        if why is not None:
            self._log(
                logging.WARNING, "refused:origin", "preview request from %s refused: %s", request.remote, why
            )
            return _json(HTTPStatus.FORBIDDEN, {"ok": False, "error": why})
        names = request.query.getall("name", [])
        if len(names) != 1 or not 0 < len(names[0]) <= MAX_SOURCE_NAME:
            allowed = f"one ?name=SOURCE (e.g. shm:cam, pattern) of at most {MAX_SOURCE_NAME} characters"
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": f"bad request; allowed: {allowed}"})
        if self._thumbnails is None:
            self._thumbnails = concurrent.futures.ThreadPoolExecutor(
                _THUMBNAIL_THREADS, thread_name_prefix=f"preview-{self.port}-thumbnail"
            )
        loop = asyncio.get_running_loop()
        try:
            jpeg = await loop.run_in_executor(self._thumbnails, operator.thumbnail, names[0])
        except ValueError as err:  # not a source name here
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": str(err)})
        except LookupError as err:  # no thumbnails in this engine
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "error": str(err)})
        except RuntimeError as err:  # the control service is not up yet
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(err)})
        if jpeg is None:
            return web.Response(status=HTTPStatus.NO_CONTENT, headers=_NO_CACHE)
        return _reply(HTTPStatus.OK, "image/jpeg", jpeg)

    async def _stream(self, request: web.Request, source: bool = False) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}", **_NO_CACHE}
        )
        response.force_close()
        await response.prepare(request)
        self._client_joined()
        loop = asyncio.get_running_loop()
        try:
            seen = 0
            next_allowed = 0.0
            while await self._newer(seen, source):
                delay = next_allowed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if self._closed:
                        break
                latest = await loop.run_in_executor(None, self._latest_jpeg, source)
                if latest is None:
                    continue
                seen, data = latest
                next_allowed = time.monotonic() + self._min_interval
                header = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                ).encode("ascii")
                await response.write(header + data + b"\r\n")
            await response.write(f"--{BOUNDARY}--\r\n".encode("ascii"))  # the sink was closed
        except DROPPED_CLIENT_ERRORS as error:
            logger.debug("preview client %s went away: %s", request.remote, error)
        # The stream's own boundary: its headers are out, so closing is all that is left to say.
        except Exception as error:
            self._failed(f"GET {request.path!r} from {request.remote}", error, "GET")
        finally:
            self._client_left()
        return response

    async def _newer(self, seen: int, source: bool) -> bool:
        """Wait until an output (``source``: input) frame newer than version ``seen`` exists;
        ``False`` once closed."""
        while True:
            ready = self._frames_ready  # taken before the check: a newer frame sets this one
            with self._cond:
                if self._closed:
                    return False
                if (self._source_version if source else self._version) > seen:
                    return True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), 1.0)

    async def _page_socket(self, request: web.Request, operator: OperatorApi) -> web.StreamResponse:
        """``/api/ws``: the operator page's pushes (a snapshot first, then each change)."""
        origin = foreign_origin(request.headers)
        if origin is not None:
            why = f"cross-origin websocket from {origin[:100]!r} refused"
            self._log(
                logging.WARNING, "refused:origin", "preview request from %s refused: %s", request.remote, why
            )
            return _text(HTTPStatus.FORBIDDEN, f"{why}\n")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_REQUEST_BYTES)
        await ws.prepare(request)
        wake = asyncio.Event()
        self._page_wakes.add(wake)
        self._sockets.add(ws)
        feeder = asyncio.create_task(self._feed_page(ws, wake, operator, str(request.remote)))
        try:
            async for _ in ws:  # the page sends nothing; reading notices when it goes
                pass
        finally:
            self._page_wakes.discard(wake)
            self._sockets.discard(ws)
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        return ws

    async def _feed_page(
        self, ws: web.WebSocketResponse, wake: asyncio.Event, operator: OperatorApi, client: str
    ) -> None:
        loop = asyncio.get_running_loop()
        last = None
        since: float | None = None
        try:
            while not ws.closed:
                wake.clear()
                try:
                    state = await loop.run_in_executor(None, operator.state)
                    message = {"type": "state", **_jsonable(state)}
                except RuntimeError as err:  # the control service is not up yet
                    message = {"type": "offline", "error": str(err)}
                text = json.dumps(message, allow_nan=False)
                if text != last:
                    await ws.send_str(text)
                    last = text
                history = await loop.run_in_executor(None, operator.history, since)
                samples = history.get("samples") or []
                if samples or since is None:
                    update = {"type": "history", "append": since is not None, **_jsonable(history)}
                    await ws.send_str(json.dumps(update, allow_nan=False))
                    since = float(samples[-1]["t"]) if samples else -math.inf
                await asyncio.sleep(_PUSH_INTERVAL_S)
                await wake.wait()
        except DROPPED_CLIENT_ERRORS as error:
            logger.debug("preview client %s went away: %s", client, error)
        # The websocket's boundary: the operator is the engine's code, the socket a stranger's.
        except Exception as error:
            self._failed(f"websocket /api/ws from {client}", error, "websocket")
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")

    # -- frames, for the handlers ------------------------------------------------------------

    def _latest_jpeg(self, source: bool = False) -> tuple[int, bytes] | None:
        """``(version, jpeg)`` of the newest output (``source``: input) frame, encoded at most once."""
        with self._encode_lock:
            with self._cond:
                frame, version = (
                    (self._source, self._source_version) if source else (self._frame, self._version)
                )
            if frame is None:
                return None
            cached = self._source_jpeg if source else self._jpeg
            if cached is None or cached[0] != version:
                cached = (version, encode_jpeg(frame.pixels, self._quality))
                if source:
                    self._source_jpeg = cached
                else:
                    self._jpeg = cached
            return cached

    def _client_allowed(self, client: str) -> bool:
        return client_allowed(self._allow, client)

    def _stats_snapshot(self) -> dict[str, Any]:
        extra = dict(self._stats()) if self._stats is not None else {}
        with self._cond:
            extra.update(frames_sent=self._frames_sent, clients=self._clients)
        return cast(dict[str, Any], _jsonable(extra))

    def _client_joined(self) -> None:
        with self._cond:
            self._clients += 1

    def _client_left(self) -> None:
        with self._cond:
            self._clients -= 1
