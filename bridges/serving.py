"""What the engine's HTTP servers (preview / operator page, OSCQuery) share at their request boundary."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bridges.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DROPPED_CLIENT_ERRORS: tuple[type[OSError], ...] = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,  # socket.timeout is an alias of TimeoutError since Python 3.10
)
"""What a client that goes away mid-answer (tab closed, laptop asleep) makes a write raise:
not worth more than a DEBUG line."""


def clip(text: str, limit: int = 200) -> str:
    """``text``, cut to ``limit`` characters (a client's text in a log line stays short)."""
    return text if len(text) <= limit else text[:limit] + "..."


def report_failure(
    log: RateLimitedLog, server: str, what: str, error: BaseException | None, where: str
) -> None:
    """One ERROR line a second per ``where`` (a bounded name, never the client's text) and kind of
    failure, saying how many more there were; the traceback at DEBUG alongside that line only."""
    kind = type(error).__name__
    message = "%s %s failed: %s: %s (traceback at DEBUG)"
    if log(logging.ERROR, f"failure:{where}:{kind}", message, server, what, kind, clip(str(error))):
        log.logger.debug("%s %s failed", server, what, exc_info=error)


async def guarded(
    request: web.Request,
    handler: Handler,
    server: str,
    log: RateLimitedLog,
    methods: tuple[str, ...],
    reply: Callable[[str, bool], web.StreamResponse],
) -> web.StreamResponse:
    """Run one request at the boundary of ``server``: a client that went away is a DEBUG line;
    anything else the handler raises is ``reply(message, True)`` (a 500 the server words) and one
    rate-limited ERROR line per method (``methods``; any other is "other") and kind of failure.

    ``reply(message, failed)``: the answer to give, ``failed`` False for a client gone.
    """
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DROPPED_CLIENT_ERRORS as error:
        logger.debug("%s client %s went away: %s", server, request.remote, error)
        return reply("client went away", False)
    # The request boundary: the input is a stranger's, and the code under it is the engine's
    # (the operator, the encoder, the namespace built from live state). Whatever they raise must
    # cost this request only, and no client may make the log grow by a traceback per request.
    except Exception as error:
        path = clip(request.path_qs, 100)
        where = request.method if request.method in methods else "other"
        report_failure(log, server, f"{request.method} {path!r} from {request.remote}", error, where)
        kind = type(error).__name__
        return reply(f"internal error ({kind}) in {request.method} {clip(request.path, 100)}", True)
