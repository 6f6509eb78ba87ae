"""The reorder buffer: outputs made out of order leave in input order; a frame too late is dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Slot(Generic[T]):
    arrived_at: float | None = None
    result: T | None = None
    lost: bool = False


class ReorderBuffer(Generic[T]):
    """Hands results back in the order their indices were given out.

    The frame loop ``expect``s every index it hands out (0, 1, 2, ... in order); whoever gets a
    result ``arrive``s it (any thread); ``release`` gives back, oldest first, every result whose
    predecessors have all arrived or been given up. An index is given up when it is ``lose``t (its
    replica died) or when a later result has waited ``hold_s`` for it: then it is *late*, and
    when it arrives after all it is dropped (``late_dropped``), never sent out of order.
    """

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError(f"hold_s {hold_s} must be >= 0")
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot[T]] = {}
        self._next_expected = 0  # the next index ``expect`` takes
        self._next_out = 0  # the oldest index not yet released or given up
        self.late_dropped = 0
        self.lost = 0

    def expect(self) -> int:
        """The next index, now awaited."""
        with self._lock:
            index = self._next_expected
            self._next_expected += 1
            self._slots[index] = _Slot()
            return index

    def arrive(self, index: int, result: T, now: float) -> bool:
        """The result of ``index``; False when it came too late (dropped) or was never expected."""
        with self._lock:
            slot = self._slots.get(index)
            if slot is None or slot.lost:
                if index < self._next_out or (slot is not None and slot.lost):
                    self.late_dropped += 1
                return False
            if slot.arrived_at is not None:
                return False  # a duplicate never goes out twice
            slot.arrived_at, slot.result = now, result
            return True

    def lose(self, index: int) -> None:
        """``index`` will never arrive (its replica is gone): nothing waits for it."""
        with self._lock:
            slot = self._slots.get(index)
            if slot is not None and slot.arrived_at is None:
                slot.lost = True
                self.lost += 1

    @property
    def waiting(self) -> int:
        """Indices handed out and not yet released or given up."""
        with self._lock:
            return sum(1 for slot in self._slots.values() if not slot.lost)

    def release(self, now: float) -> list[tuple[int, T]]:
        """The results that may leave now, in index order."""
        out: list[tuple[int, T]] = []
        with self._lock:
            self._give_up_late(now)
            while self._next_out < self._next_expected:
                slot = self._slots[self._next_out]
                if slot.lost:
                    del self._slots[self._next_out]
                elif slot.arrived_at is not None:
                    assert slot.result is not None
                    out.append((self._next_out, slot.result))
                    del self._slots[self._next_out]
                else:
                    break
                self._next_out += 1
        return out

    def _give_up_late(self, now: float) -> None:
        """A result that waited ``hold_s`` lets go of every older index still missing."""
        oldest_missing = None
        for index in self._ordered():
            slot = self._slots[index]
            if slot.lost:
                continue
            if slot.arrived_at is None:
                if oldest_missing is None:
                    oldest_missing = index
                continue
            if oldest_missing is not None and now - slot.arrived_at >= self.hold_s:
                for late in range(oldest_missing, index):
                    missing = self._slots.get(late)
                    if missing is not None and missing.arrived_at is None and not missing.lost:
                        missing.lost = True  # it will be dropped if it still comes
                oldest_missing = None

    def _ordered(self) -> Iterator[int]:
        return iter(range(self._next_out, self._next_expected))
