"""ControlState: live parameter values written by control handlers, read at frame boundaries."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.params import ENCODED_PARAMS, merge_changes


@dataclass(frozen=True)
class Pending:
    """Validated changes waiting for the next frame boundary, plus the prompt crossfade."""

    changes: dict[str, Any]
    crossfade_s: float = 0.0


@dataclass(order=True)
class Held:
    """A validated change that waits for its time (a quantised change, a sequence step).

    ``due``: ``time.monotonic()`` at which the frame loop commits it; ``tag``: who holds it (a
    newer hold of the same tag may cancel it); ``warmed``: its prompts / images are in the
    encoders' caches (the prompt worker warms them while it waits).
    """

    due: float
    order: int
    changes: dict[str, Any] = field(compare=False)
    crossfade_s: float = field(compare=False, default=0.0)
    tag: str | None = field(compare=False, default=None)
    warmed: bool = field(compare=False, default=True)


class ControlState:
    """Typed, versioned store between control threads and the engine loop.

    Handlers call ``write`` with values already validated against the registry. Changes
    coalesce: ten fader moves between two frames become one change with the last value.
    Prompt changes wait in a separate box until a worker has encoded them
    (``take_for_encoding`` → ``release_encoded``), so the frame loop never waits on the text
    encoder. ``applied`` holds what the engine really runs with (for ``/status`` and echoes);
    ``wait_applied`` lets a watcher off the frame loop follow it (``engine.control.changes``).

    A change written with a ``due`` time is held (``Held``) until the frame loop asks for changes
    at or after that time: its prompts are encoded meanwhile (``take_to_warm``), so a change meant
    for a beat commits without waiting for the text encoder. ``latest`` reads a value as the next
    frame will see it (pending, else applied); ``edit`` changes one value from that, atomically.
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
        self._held: list[Held] = []  # a heap by due time
        self._held_order = 0
        self._to_warm: list[Held] = []

    def write(
        self,
        changes: Mapping[str, Any],
        crossfade_s: float = 0.0,
        due: float | None = None,
        tag: str | None = None,
    ) -> int:
        """Queue validated changes; returns the new version.

        ``due`` (``time.monotonic()``): hold them until the frame loop takes changes at that time
        (``take_pending(now)``); ``tag`` names the holder for ``cancel``.
        """
        if due is not None:
            return self._hold(changes, crossfade_s, due, tag)
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

    def _hold(self, changes: Mapping[str, Any], crossfade_s: float, due: float, tag: str | None) -> int:
        with self._lock:
            self._held_order += 1
            encoded = any(name in ENCODED_PARAMS for name in changes)
            held = Held(due, self._held_order, dict(changes), crossfade_s, tag, warmed=not encoded)
            heapq.heappush(self._held, held)
            if encoded:
                self._to_warm.append(held)
            self.version += 1
            self._lock.notify_all()
            return self.version

    def cancel(self, tag: str) -> int:
        """Drop every held change of ``tag``; how many were dropped."""
        with self._lock:
            kept = [held for held in self._held if held.tag != tag]
            dropped = len(self._held) - len(kept)
            heapq.heapify(kept)
            self._held = kept
            self._to_warm = [held for held in self._to_warm if held.tag != tag]
            return dropped

    def held(self) -> list[Held]:
        """The held changes in due order (copies of the list, for status and tests)."""
        with self._lock:
            return sorted(self._held)

    def next_due(self) -> float | None:
        """The due time of the first held change (``None``: none is held)."""
        with self._lock:
            return self._held[0].due if self._held else None

    def take_to_warm(self) -> Held | None:
        """A held change whose prompts or images the encoding worker should cache now."""
        with self._lock:
            return self._to_warm.pop(0) if self._to_warm else None

    def warmed(self, held: Held) -> None:
        """The worker cached ``held``'s prompts: when due it commits without the encoder."""
        with self._lock:
            held.warmed = True

    def latest(self, name: str, default: Any = None) -> Any:
        """``name`` as the next frame will see it: the newest value written (pending or being
        encoded), else the applied one. Held changes do not count: they have not happened yet."""
        with self._lock:
            for box in (self._pending, self._to_encode):
                if name in box:
                    return box[name]
            return self._applied.get(name, default)

    def edit(self, name: str, change: Callable[[Any], Any]) -> Any:
        """Write ``change(latest(name))`` as ``name``'s new value, atomically (two edits of a list
        between two frames both count); returns the value written. ``change`` validates and
        may raise; nothing is written then."""
        with self._lock:
            value = change(self.latest(name))
            self.write({name: value})
            return value

    def take_for_encoding(self, timeout: float) -> tuple[dict[str, Any], float] | None:
        """Prompt changes for the encoding worker (``None`` after ``timeout`` without any)."""
        with self._lock:
            if not self._to_encode and not self._to_warm:
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

    def take_pending(self, now: float | None = None) -> Pending | None:
        """Everything ready to apply now (the engine loop calls this once per frame).

        ``now``: held changes due at or before it join, in due order (newer values win); one
        whose prompts are not cached yet goes to the encoder first and follows when it is done.
        """
        with self._lock:
            while now is not None and self._held and self._held[0].due <= now:
                held = heapq.heappop(self._held)
                if held.warmed:
                    self._pending = merge_changes(self._pending, held.changes)
                    if held.crossfade_s > 0:
                        self._pending_crossfade_s = held.crossfade_s
                else:
                    if held in self._to_warm:
                        self._to_warm.remove(held)
                    self._to_encode = merge_changes(self._to_encode, held.changes)
                    self._crossfade_s = held.crossfade_s
                    self._lock.notify_all()
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
