"""ControlState: live parameter values written by control handlers, read at frame boundaries."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.params import ENCODED_PARAMS, merge_changes


@dataclass(frozen=True)
class Pending:
    """Validated changes waiting for the next frame boundary, plus the prompt crossfade."""

    changes: dict[str, Any]
    crossfade_s: float = 0.0


class ControlState:
    """Typed, versioned store between control threads and the engine loop.

    Handlers call ``write`` with values already validated against the registry. Changes
    coalesce: ten fader moves between two frames become one change with the last value.
    Prompt changes wait in a separate box until a worker has encoded them
    (``take_for_encoding`` → ``release_encoded``), so the frame loop never waits on the text
    encoder. ``applied`` holds what the engine really runs with (for ``/status`` and echoes);
    ``wait_applied`` lets a watcher off the frame loop follow it (``engine.control.changes``).
    """

    def __init__(self, applied: Mapping[str, Any] | None = None) -> None:
        self._lock = threading.Condition()
        self._pending: dict[str, Any] = {}
        self._to_encode: dict[str, Any] = {}
        self._crossfade_s = 0.0
        self._pending_crossfade_s = 0.0
        self._applied: dict[str, Any] = dict(applied or {})
        self.version = 0
        self.applied_version = 0
        # Its own condition: a watcher waiting for applied values never wakes the encoder, and
        # the frame loop only notifies (never waits) on it.
        self._applied_changed = threading.Condition()

    def write(self, changes: Mapping[str, Any], crossfade_s: float = 0.0) -> int:
        """Queue validated changes; returns the new version."""
        with self._lock:
            encoded = {name: value for name, value in changes.items() if name in ENCODED_PARAMS}
            if encoded:
                self._to_encode = merge_changes(self._to_encode, encoded)
                self._crossfade_s = crossfade_s
            rest = {name: value for name, value in changes.items() if name not in ENCODED_PARAMS}
            self._pending = merge_changes(self._pending, rest)
            self.version += 1
            self._lock.notify_all()
            return self.version

    def take_for_encoding(self, timeout: float) -> tuple[dict[str, Any], float] | None:
        """Prompt changes for the encoding worker (``None`` after ``timeout`` without any)."""
        with self._lock:
            if not self._to_encode:
                self._lock.wait(timeout)
            if not self._to_encode:
                return None
            taken, self._to_encode = self._to_encode, {}
            return taken, self._crossfade_s

    def release_encoded(self, changes: Mapping[str, Any], crossfade_s: float) -> None:
        """Encoded prompt changes become pending for the next frame boundary."""
        with self._lock:
            self._pending = merge_changes(self._pending, changes)
            self._pending_crossfade_s = crossfade_s
            self._lock.notify_all()

    def take_pending(self) -> Pending | None:
        """Everything ready to apply now (the engine loop calls this once per frame)."""
        with self._lock:
            if not self._pending:
                return None
            taken, self._pending = self._pending, {}
            crossfade, self._pending_crossfade_s = self._pending_crossfade_s, 0.0
            return Pending(taken, crossfade if any(k in ENCODED_PARAMS for k in taken) else 0.0)

    def mark_applied(self, accepted: Mapping[str, Any]) -> None:
        """Record what the engine accepted (the values echoed to control surfaces)."""
        with self._lock:
            self._applied.update(accepted)
            self.applied_version += 1
        with self._applied_changed:
            self._applied_changed.notify_all()

    def wait_applied(self, seen: int, timeout: float) -> int:
        """Wait until ``applied_version`` differs from ``seen`` (at most ``timeout`` seconds);
        the version then. For watchers off the frame loop."""
        with self._applied_changed:
            self._applied_changed.wait_for(lambda: self.applied_version != seen, timeout)
            return self.applied_version

    def applied(self) -> dict[str, Any]:
        """A copy of the values the engine runs with."""
        with self._lock:
            return dict(self._applied)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()
