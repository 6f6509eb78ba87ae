"""Preview sink: an HTTP page with the live output as MJPEG and the engine's stats; with an operator,
the operator page (input and output, every live parameter, scenes, a plot of fps and latency)."""

from __future__ import annotations

import errno
import importlib.util
import io
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import numpy as np

from bridges.base import BridgeError, BridgeUnavailable, Closing, Frame
from bridges.ratelimit import RateLimitedLog
from bridges.serving import DROPPED_CLIENT_ERRORS, clip, report_failure

logger = logging.getLogger(__name__)

BOUNDARY = "frame"
MAX_REQUEST_BYTES = 64 * 1024  # a parameter change; prompts are at most 2000 characters
#: How deep ``[`` and ``{`` may nest in a request body. The API's deepest body is 3 levels
#: (``{"name": "prompt_blend", "value": [["a", 1.0], ...]}``); 16 leaves room for any change to the
#: API and stays far below the depth at which ``json.loads`` recurses out of the stack.
MAX_JSON_DEPTH = 16


class OperatorApi(Protocol):
    """What the operator page reads and writes (``engine.control.operator.Operator``).

    ``apply`` validates exactly as OSC does and returns ``(accepted, JSON body)``; the reads
    raise ``RuntimeError`` while the engine's control service is not running yet.
    """

    def spec(self) -> Mapping[str, Any]: ...

    def state(self) -> Mapping[str, Any]: ...

    def history(self) -> Mapping[str, Any]: ...

    def apply(self, name: Any, value: Any, client: str) -> tuple[bool, Mapping[str, Any]]: ...


_CLIENT_SOCKET_TIMEOUT_S = 10.0  # a stalled browser is dropped after this long
_CLOSE_TIMEOUT_S = 2.0
_LOG_INTERVAL_S = 1.0  # a failure or refusal that repeats is logged at most this often (per kind)

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


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>latentstage preview</title>
<link rel="icon" href="data:,">
<style>
  html, body { margin: 0; height: 100%; background: #0b0b0d; color: #c8c8d0;
    font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
  body { display: flex; flex-direction: column; }
  #view { flex: 1; min-height: 0; display: flex; align-items: center; justify-content: center;
    position: relative; }
  #out { max-width: 100%; max-height: 100%; object-fit: contain; background: #000; }
  #wait { position: absolute; color: #66666f; }
  #stats { display: flex; flex-wrap: wrap; gap: 2px 16px; padding: 6px 10px;
    border-top: 1px solid #222228; background: #111115; }
  #stats span { white-space: nowrap; }
  #stats b { color: #7f7f8a; font-weight: normal; }
  #stats .bad { color: #ff6b6b; }
</style>
</head>
<body>
<div id="view">
  <img id="out" src="/stream.mjpg" alt="live output" title="double-click: full screen">
  <div id="wait">waiting for frames&hellip;</div>
</div>
<div id="stats">connecting&hellip;</div>
<script>
(function () {
  "use strict";
  var img = document.getElementById("out");
  var wait = document.getElementById("wait");
  var line = document.getElementById("stats");
  img.addEventListener("dblclick", function () {
    if (document.fullscreenElement) { document.exitFullscreen(); }
    else if (img.requestFullscreen) { img.requestFullscreen(); }
  });
  img.addEventListener("error", function () {
    // The engine restarted or the stream ended: reconnect shortly.
    setTimeout(function () { img.src = "/stream.mjpg?t=" + Date.now(); }, 1000);
  });
  function fmt(v) {
    if (typeof v === "number") {
      if (Number.isInteger(v)) { return String(v); }
      return Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(1);
    }
    if (v === null) { return "-"; }
    if (typeof v === "object") { return JSON.stringify(v); }
    return String(v);
  }
  function render(stats) {
    line.textContent = "";
    Object.keys(stats).forEach(function (key) {
      var item = document.createElement("span");
      var name = document.createElement("b");
      name.textContent = key + ": ";
      item.appendChild(name);
      item.appendChild(document.createTextNode(fmt(stats[key])));
      line.appendChild(item);
    });
    wait.style.display = stats.frames_sent > 0 ? "none" : "";
  }
  function poll() {
    fetch("/stats.json", { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(render)
      .catch(function () {
        line.innerHTML = '<span class="bad">engine not reachable</span>';
      })
      .finally(function () { setTimeout(poll, 250); });
  }
  poll();
})();
</script>
</body>
</html>
"""


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


def is_loopback(address: str) -> bool:
    """Whether a bound IP address is reachable only from this machine."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def _known_host(host: str) -> bool:
    """An IP literal, localhost or this machine's own name, plain, fully qualified or mDNS
    (``name.local``): what a browser on stage shows for us."""
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    if host in names or host.removesuffix(".local") in names:
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR lets a restarted engine rebind at once; on Windows it would instead let two
    # servers share the port silently, so there the port-in-use error is kept.
    allow_reuse_address = sys.platform != "win32"

    def __init__(self, address: tuple[str, int], sink: PreviewSink) -> None:
        self.sink = sink
        self.log = RateLimitedLog(logger, _LOG_INTERVAL_S)  # failures, refusals: no client fills the disk
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escaped a handler outside ``do_GET``/``do_POST`` (reading the request line, the
        final flush): one line per kind a second, the traceback only at DEBUG."""
        error = sys.exc_info()[1]
        if isinstance(error, DROPPED_CLIENT_ERRORS):
            logger.debug("preview client %s went away: %s", client_address, error)
        else:
            self.report_failure(f"request from {client_address[0]}", error)

    def report_failure(self, what: str, error: BaseException | None, where: str = "server") -> None:
        """``bridges.serving.report_failure``: a line a second per ``where`` and kind of failure."""
        report_failure(self.log, "preview", what, error, where)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "latentstage-preview"
    timeout = _CLIENT_SOCKET_TIMEOUT_S
    _responded = False  # whether this request's status line was queued or sent

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def _guarded(self, handle: Callable[[], None]) -> None:
        """Run one request: a client that went away is a DEBUG line; anything else is a 500 (or,
        once the response has begun, a closed connection) and one rate-limited line."""
        self._responded = False
        try:
            handle()
        except DROPPED_CLIENT_ERRORS as error:
            logger.debug("preview client %s went away: %s", self.client_address, error)
            self.close_connection = True
        # The request boundary: the input is a stranger's, and the code under it (the operator,
        # the encoder, the stats callback) is the engine's. Whatever they raise must cost this
        # request only, and no client may make the log grow by a traceback per request.
        except Exception as error:
            self.close_connection = True
            server = cast(_Server, self.server)
            path = clip(urlsplit(self.path).path, 100)
            what = f"{self.command} {path!r} from {self.client_address[0]}"
            server.report_failure(what, error, where=self.command)  # only GET or POST get here
            if self._responded:
                return  # headers (a stream's) are out: closing is all that is left to say
            reply = {
                "ok": False,
                "error": f"internal error ({type(error).__name__}) in {self.command} {path}; "
                "the engine's log has the details",
            }
            try:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, reply)
            except OSError as gone:  # the client is gone as well
                logger.debug("preview client %s went away: %s", self.client_address, gone)

    def _get(self) -> None:
        sink = cast(_Server, self.server).sink
        path = urlsplit(self.path).path
        if not self._allowed(sink):
            return
        if path in ("/", "/index.html"):
            self._reply(HTTPStatus.OK, "text/html; charset=utf-8", sink._page())
        elif path == "/preview":
            self._reply(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/stream.mjpg":
            self._stream(sink)
        elif path == "/input.mjpg":
            self._stream(sink, source=True)
        elif path in ("/api/spec", "/api/state", "/api/history"):
            self._api_get(sink, path.removeprefix("/api/"))
        elif path == "/frame.jpg":
            latest = sink._latest_jpeg()
            if latest is None:
                self._reply(
                    HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", b"no frame yet\n"
                )
            else:
                self._reply(HTTPStatus.OK, "image/jpeg", latest[1])
        elif path == "/stats.json":
            body = json.dumps(sink._stats_snapshot(), allow_nan=False).encode()
            self._reply(HTTPStatus.OK, "application/json", body)
        else:
            self._reply(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _post(self) -> None:
        """``/api/param``: one change ``{"name": ..., "value": ...}`` through the OSC validation."""
        sink = cast(_Server, self.server).sink
        if not self._allowed(sink):
            return
        if urlsplit(self.path).path != "/api/param" or sink._operator is None:
            self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "not found"})
            return
        refusal = self._write_refusal()
        if refusal is not None:
            self._json(refusal[0], {"ok": False, "error": refusal[1]})
            return
        allowed = f'a JSON object {{"name": ..., "value": ...}} of at most {MAX_REQUEST_BYTES} bytes'
        error = f"bad request; allowed: {allowed}"
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = parse_json_body(self.rfile.read(length)) if 0 < length <= MAX_REQUEST_BYTES else None
        except JsonTooDeep as err:
            body, error = None, str(err)
        except ValueError:  # not a number, not text, not JSON (UnicodeDecodeError is a ValueError)
            body = None
        if not isinstance(body, dict) or "name" not in body or "value" not in body:
            self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": error})
            return
        try:
            accepted, reply = sink._operator.apply(body["name"], body["value"], self.client_address[0])
        except RuntimeError as err:  # the control service is not up yet
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(err)})
            return
        self._json(HTTPStatus.OK if accepted else HTTPStatus.BAD_REQUEST, dict(reply))

    def _write_refusal(self) -> tuple[HTTPStatus, str] | None:
        """Writes come from the page itself: same origin (a browser sends ``Origin`` with every
        cross-site POST) and a JSON body (a form or ``no-cors`` request cannot send one)."""
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin is not None and urlsplit(origin).netloc != host:
            return HTTPStatus.FORBIDDEN, f"cross-origin write from {origin[:100]!r} refused"
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "writes must be Content-Type: application/json"
        return None

    def _allowed(self, sink: PreviewSink) -> bool:
        """A client outside the allow-list (when bound beyond this machine) gets 403, and so does
        a request for a host name other than an address, localhost or this machine's name (a DNS
        rebinding page would otherwise be "same origin")."""
        client = self.client_address[0]
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if not _known_host(host):
            kind, why = "host", f"Host {host[:100]!r} is not this machine's address or name"
        elif not sink._client_allowed(client):
            kind, why = "client", "not in the allow-list"
        else:
            return True
        self._reply(HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8", f"{why}\n".encode())
        log = cast(_Server, self.server).log  # a scan of the network must not fill the disk either
        log(logging.WARNING, f"refused:{kind}", "preview request from %s refused: %s", client, why)
        return False

    def _api_get(self, sink: PreviewSink, what: str) -> None:
        operator = sink._operator
        if operator is None:
            self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "this preview has no operator page"})
            return
        try:
            body = {"spec": operator.spec, "state": operator.state, "history": operator.history}[what]()
        except RuntimeError as err:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(err)})
            return
        self._json(HTTPStatus.OK, _jsonable(body))

    def _json(self, status: HTTPStatus, body: Any) -> None:
        self._reply(status, "application/json", json.dumps(body, allow_nan=False).encode())

    def _headers(self, status: HTTPStatus, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store, no-cache, must-revalidate")
        self.send_header("Pragma", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")

    def _reply(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self._headers(status, content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, sink: PreviewSink, source: bool = False) -> None:
        self.close_connection = True
        self._headers(HTTPStatus.OK, f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Connection", "close")
        self.end_headers()
        sink._client_joined()
        try:
            seen = 0
            next_allowed = 0.0
            while sink._wait_for_newer(seen, source):
                delay = next_allowed - time.monotonic()
                if delay > 0 and sink._closed_event.wait(delay):
                    break
                latest = sink._latest_jpeg(source)
                if latest is None:
                    continue
                seen, data = latest
                next_allowed = time.monotonic() + sink._min_interval
                header = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                ).encode("ascii")
                self.wfile.write(header + data + b"\r\n")
            self.wfile.write(f"--{BOUNDARY}--\r\n".encode("ascii"))  # the sink was closed
        finally:
            sink._client_left()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("preview %s: " + format, self.address_string(), *args)


class PreviewSink(Closing):
    """A ``FrameSink`` that serves the live output to a browser at ``http://host:port/``.

    Pages: ``/`` (the output and a stats line), ``/stream.mjpg`` (MJPEG, newest frame only,
    at most ``max_fps`` per client; a slow client misses frames instead of building a
    backlog), ``/frame.jpg`` (the latest frame; 503 before the first), ``/stats.json``
    (``stats()`` plus ``frames_sent`` and ``clients``).

    ``send`` only stores a reference to the frame and wakes the clients, so it must not be
    modified afterwards; JPEG encoding happens once per new frame in the HTTP threads, and
    only when a client asks. After ``close`` (safe to call twice) ``send`` is a no-op, so a
    runtime that is shutting down never sees an error from here.

    With an ``operator`` (``OperatorApi``) ``/`` is the operator page instead (the plain page
    stays at ``/preview``): input (``/input.mjpg``, from ``send_input``) and output side by side,
    every live parameter, scenes, the state and a plot; ``/api/spec``, ``/api/state``,
    ``/api/history`` read and ``POST /api/param`` writes through the operator. Bound beyond
    this machine, only clients in ``allow`` (addresses or networks, as ``osc.allow``) are served.

    Raises ``BridgeError`` when ``host:port`` cannot be bound (e.g. the port is in use), and
    ``ValueError`` for a host beyond this machine without an ``allow`` list or a bad entry in it.
    ``port=0`` picks a free port; the one chosen is ``.port`` and the page is ``.url``.
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
        try:
            self._allow = [ipaddress.ip_network(entry, strict=False) for entry in allow]
        except ValueError as err:
            raise ValueError(
                f"preview allow: {err}; allowed: IP addresses or networks like 192.168.1.0/24"
            ) from err
        if not is_loopback(host) and host != "localhost" and not self._allow:
            raise ValueError(
                f"preview host {host!r} is reachable from other machines: give the addresses allowed "
                "to see and steer it (osc.allow, e.g. [192.168.1.0/24]), or use host 127.0.0.1"
            )
        self._operator = operator
        self._stats = stats
        self._quality = int(jpeg_quality)
        self._min_interval = 1.0 / float(max_fps)

        self._cond = threading.Condition()  # guards frame, version, counters, closed
        self._frame: Frame | None = None
        self._version = 0  # our own counter: Frame.sequence may repeat or restart
        self._frames_sent = 0
        self._clients = 0
        self._closed_event = threading.Event()
        self._encode_lock = threading.Lock()  # one encoder at a time; guards the cache
        self._jpeg: tuple[int, bytes] | None = None
        self._source: Frame | None = None  # the newest input frame (the operator page shows it)
        self._source_version = 0
        self._source_jpeg: tuple[int, bytes] | None = None

        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), self)
        except OSError as error:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if error.errno == errno.EADDRINUSE:
                other = port + 1 if 0 < port < 65535 else 8081
                raise BridgeError(
                    f"cannot serve the preview on {where}: the port is in use (another "
                    f"latentstage or another program); choose another port, e.g. "
                    f"`outputs: [{{type: preview, port: {other}}}]`"
                ) from error
            raise BridgeError(f"cannot serve the preview on {where}: {error}") from error

        bound_host = str(self._server.server_address[0])
        self.port = int(self._server.server_address[1])
        self.host = host
        self.url = f"http://{self._url_host(bound_host)}:{self.port}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"preview-http-{self.port}",
            daemon=True,
        )
        self._thread.start()
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
            self._cond.notify_all()

    def send_input(self, frame: Frame) -> None:
        """Make ``frame`` the newest input frame (``/input.mjpg``); cheap, like ``send``."""
        with self._cond:
            if self._closed:
                return
            self._source = frame
            self._source_version += 1
            self._cond.notify_all()

    def _release(self) -> None:
        """Stop serving, end the streams and release the port."""
        with self._cond:  # wakes the streams: they see ``_closed`` and end
            self._closed_event.set()
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("preview server thread did not stop within %.0f s", _CLOSE_TIMEOUT_S)
        with self._cond:  # give streaming handlers a moment to leave their loops
            self._cond.wait_for(lambda: self._clients == 0, timeout=_CLOSE_TIMEOUT_S)
        self._jpeg = self._source_jpeg = None
        logger.debug("preview on port %d closed", self.port)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- used by the HTTP threads ----------------------------------------------------------

    def _wait_for_newer(self, seen: int, source: bool = False) -> bool:
        """Block until an output (``source``: input) frame newer than version ``seen`` exists;
        ``False`` once closed."""
        with self._cond:
            while not self._closed and (self._source_version if source else self._version) <= seen:
                self._cond.wait(1.0)
            return not self._closed

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

    def _page(self) -> bytes:
        if self._operator is None:
            return PAGE.encode()
        from bridges.operator_page import OPERATOR_PAGE

        return OPERATOR_PAGE.encode()

    def _client_allowed(self, client: str) -> bool:
        if is_loopback(client) or not self._allow:  # bound to this machine: nobody else gets here
            return True
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._allow)

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
            self._cond.notify_all()
