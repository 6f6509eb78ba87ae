"""A logger wrapper that says a repeated message at most once per interval per key (bridges and engine)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class RateLimitedLog:
    """Logs a message at most once per ``interval`` seconds per key (then counts repeats)."""

    def __init__(self, log: logging.Logger, interval: float = 1.0) -> None:
        self.logger = log
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, level: int, key: str, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval; whether it was."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            repeats = self._suppressed.pop(key, 0)
        suffix = f" (and {repeats} more like it)" if repeats else ""
        self.logger.log(level, message + suffix, *args)
        return True
