"""ChangeFeed: a thread that follows ControlState's applied values and tells listeners which changed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from bridges.ratelimit import RateLimitedLog
from engine.control.state import ControlState

logger = logging.getLogger(__name__)

Listener = Callable[[Mapping[str, Any]], None]
_WAIT_S = 0.5  # how often the thread looks at its stop flag while nothing changes
_MISSING = object()


class ChangeFeed:
    """Calls each listener with ``{name: value}`` of the applied values that changed.

    The frame loop only bumps ``ControlState.applied_version`` and notifies; this thread (not
    the frame loop) compares snapshots, so ten changes between two looks become one call with
    the newest values, and a slow listener delays only the next call, never a frame.
    Listeners run on this thread: they must hand work on (e.g. to a web server's loop), not
    block; one that raises is logged (rate-limited) and told the next change again. ``start``
    once; ``close`` (safe twice) stops and joins the thread.
    """

    def __init__(self, control: ControlState) -> None:
        self._control = control
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latentstage-changes", daemon=True)
        self._log = RateLimitedLog(logger, 5.0)

    def subscribe(self, listener: Listener) -> None:
        """Add ``listener`` (before ``start``)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * _WAIT_S + 1.0)

    def _run(self) -> None:
        seen = self._control.applied_version
        before = self._control.applied()
        while not self._stop.is_set():
            version = self._control.wait_applied(seen, _WAIT_S)
            if version == seen:
                continue
            seen = version
            now = self._control.applied()
            changed = {name: value for name, value in now.items() if before.get(name, _MISSING) != value}
            before = now
            if changed:
                for listener in self._listeners:
                    self._tell(listener, changed)

    def _tell(self, listener: Listener, changed: Mapping[str, Any]) -> None:
        # The feed's boundary: a listener (a page socket, OSCQuery's subscribers) that fails on
        # one change must not end the pushes of an installation that runs for weeks; its failure
        # is one line every few seconds, the traceback at DEBUG, and the next change is told.
        try:
            listener(changed)
        except Exception as error:
            kind = type(error).__name__
            name = getattr(listener, "__qualname__", repr(listener))
            if self._log(logging.ERROR, f"listener:{name}:{kind}", "change feed: %s failed: %s: %s "
                         "(traceback at DEBUG)", name, kind, error):
                logger.debug("change feed: %s failed", name, exc_info=error)
