"""ChangeFeed: a thread that follows ControlState's applied values and tells listeners which changed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

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
    block. ``start`` once; ``close`` (safe twice) stops and joins the thread.
    """

    def __init__(self, control: ControlState) -> None:
        self._control = control
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latentstage-changes", daemon=True)

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
                    listener(changed)
