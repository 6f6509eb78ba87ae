"""An aiohttp server on a thread and event loop of its own: listeners bound at once, served until close."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bridges.ratelimit import RateLimitedLog
from bridges.serving import DROPPED_CLIENT_ERRORS, report_failure

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 3.0
#: A connection that sends no request for this long (a stalled or idle client) is dropped.
IDLE_TIMEOUT_S = 10.0
#: How long ``close`` lets handlers finish after the shutdown hooks ended streams and sockets.
SHUTDOWN_TIMEOUT_S = 1.0


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's own server log, kept as quiet as the request boundary: a malformed request
    (already answered 400) or a client gone is a DEBUG line; any other failure one ERROR line a
    second per kind, the traceback at DEBUG. No client can make the log grow by a traceback."""

    def __init__(self, name: str) -> None:
        super().__init__(logger, {})
        self._name = name
        self._limited = RateLimitedLog(logger, 1.0)

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        error = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(error, (HttpProcessingError, *DROPPED_CLIENT_ERRORS)) or not isinstance(
            error, BaseException
        ):
            logger.debug("%s: " + str(msg) + ": %s", self._name, *args, error)
            return
        report_failure(self._limited, self._name, str(msg) % args if args else str(msg), error, "protocol")


class WebServer:
    """aiohttp applications served from one thread with its own event loop.

    ``listen(app, host, port)`` binds a listening socket in the caller's thread (so a port in
    use is an ``OSError`` there, and ``port=0`` tells the port chosen); ``start()`` serves every
    bound app; ``call(fn, *args)`` runs ``fn`` on the loop from any thread (a no-op once closed);
    ``close()`` (safe twice) runs the apps' shutdown hooks, stops the loop, joins the thread and
    the loop's executor threads and releases the ports. The frame loop never waits on it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._listeners: list[tuple[web.Application, socket.socket]] = []
        self._runners: list[web.AppRunner] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._server_log = _ServerLog(f"{name} web server")

    def listen(self, app: web.Application, host: str, port: int) -> int:
        """Bind ``host:port`` for ``app`` now; the port bound. Raises ``OSError`` when it cannot."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR lets a restarted engine rebind at once; on Windows it would instead let
            # two servers share the port silently, so there the port-in-use error is kept.
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listeners.append((app, sock))
        return int(sock.getsockname()[1])

    def bound_host(self, index: int = 0) -> str:
        """The address listener ``index`` is bound to."""
        return str(self._listeners[index][1].getsockname()[0])

    def start(self) -> None:
        """Serve every bound app (returns once they accept connections)."""
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-web", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start_sites(), self.loop).result(_START_TIMEOUT_S)
        except BaseException:
            self.close()  # no thread and no port left behind
            raise

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the server's loop soon; from any thread, never blocking."""
        with self._lock:
            if self._closed or self._thread is None:
                return
            self.loop.call_soon_threadsafe(callback, *args)

    def run(self, coroutine: Awaitable[Any]) -> concurrent.futures.Future[Any]:
        """Schedule ``coroutine`` on the server's loop (its future, for a caller that may wait)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self.run(self._cleanup()).result(_STOP_TIMEOUT_S + SHUTDOWN_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                logger.warning("%s web server did not shut down within %.0f s", self.name, _STOP_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("%s web server thread did not stop within %.0f s", self.name, _STOP_TIMEOUT_S)
        else:
            self.loop.close()
        for _, sock in self._listeners:
            sock.close()

    # ------------------------------------------------------------------ on the server's thread
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_default_executor())  # joins its threads
        finally:
            self.loop.close()

    async def _start_sites(self) -> None:
        for app, sock in self._listeners:
            runner = web.AppRunner(
                app,
                access_log=None,
                logger=self._server_log,
                keepalive_timeout=IDLE_TIMEOUT_S,
                shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            )
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._runners.append(runner)

    async def _cleanup(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
