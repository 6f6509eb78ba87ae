"""What the engine's HTTP servers (preview / operator page, OSCQuery) share at their request boundary."""

from __future__ import annotations

import logging

from bridges.ratelimit import RateLimitedLog

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
