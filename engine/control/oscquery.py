"""OSCQuery: an HTTP endpoint describing every OSC address, its type, range and current value."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from bridges.ratelimit import RateLimitedLog
from bridges.serving import DROPPED_CLIENT_ERRORS, report_failure
from engine import params
from engine.control.dispatch import osc_args
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
    values: Mapping[str, Any], engine: Mapping[str, Any], osc_host: str, osc_port: int
) -> dict[str, Any]:
    """The whole OSCQuery tree (root node) from the registry and current values."""
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
            "LISTEN": False,
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


class OscQueryServer:
    """Serves the namespace over HTTP on ``host:port`` (own thread); ``close()`` safe twice."""

    def __init__(
        self,
        values: Callable[[], Mapping[str, Any]],
        engine: Callable[[], Mapping[str, Any]],
        osc_host: str,
        osc_port: int,
        host: str = "127.0.0.1",
        port: int = 9002,
    ) -> None:
        self._values, self._engine = values, engine
        self.osc_host, self.osc_port = osc_host, osc_port
        outer = self
        self._log = RateLimitedLog(logger, 1.0)  # failures: a client must not fill the disk

        class Handler(BaseHTTPRequestHandler):
            server_version = "latentstage-oscquery"

            def do_GET(self) -> None:
                try:
                    status, body = outer.respond(self.path)
                    data = json.dumps(body).encode() if body is not None else b""
                # The request boundary: the path is a stranger's and the namespace is built from
                # the engine's live state; whatever fails costs this request a 500 and the log a
                # line a second, never a traceback per request.
                except Exception as err:
                    outer._failed(f"GET {self.path[:100]!r}", err, "GET")
                    status = HTTPStatus.INTERNAL_SERVER_ERROR
                    data = json.dumps({"error": f"internal error ({type(err).__name__})"}).encode()
                    self.close_connection = True
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except DROPPED_CLIENT_ERRORS as err:
                    logger.debug("oscquery client %s went away: %s", self.client_address, err)
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("oscquery: " + format, *args)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                """What escaped outside ``do_GET`` (reading the request line, the last flush)."""
                error = sys.exc_info()[1]
                if isinstance(error, DROPPED_CLIENT_ERRORS):
                    logger.debug("oscquery client %s went away: %s", client_address, error)
                else:
                    outer._failed(f"request from {client_address[0]}", error, "server")

        try:
            self._server = Server((host, port), Handler)
        except OSError as err:
            raise OSError(f"OSCQuery cannot listen on {host}:{port} ({err.strerror})") from err
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="latentstage-oscquery", daemon=True
        )
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        logger.info("OSCQuery on http://127.0.0.1:%s/", self.port)

    def respond(self, raw_path: str) -> tuple[int, Any]:
        """(status, JSON body) for a request path such as ``/prompt?VALUE``."""
        parts = urlsplit(raw_path)
        path, query = unquote(parts.path) or "/", parts.query
        if query == "HOST_INFO":
            return HTTPStatus.OK, host_info(self.osc_host, self.osc_port)
        root = build_namespace(self._values(), self._engine(), self.osc_host, self.osc_port)
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

    def _failed(self, what: str, error: BaseException | None, where: str) -> None:
        """``bridges.serving.report_failure``: a line a second per ``where`` and kind of failure."""
        report_failure(self._log, "OSCQuery", what, error, where)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
