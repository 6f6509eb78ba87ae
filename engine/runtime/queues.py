"""Hand-over points between threads: a newest-wins slot and a bounded drop-oldest queue."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds one item; ``put`` replaces it and never blocks (newest frame wins).

    A slow consumer therefore never builds a backlog and never blocks the producer;
    ``overwritten`` counts the items that were replaced before anyone took them.
    """

    def __init__(self) -> None:
        self._item: T | None = None
        self._has_item = False
        self._cond = threading.Condition()
        self.overwritten = 0
        self.put_count = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._has_item:
                self.overwritten += 1
            self._item, self._has_item = item, True
            self.put_count += 1
            self._cond.notify_all()

    def take(self, timeout: float) -> T | None:
        """The newest item (removing it), or ``None`` after ``timeout`` seconds without one."""
        with self._cond:
            if not self._has_item:
                self._cond.wait(timeout)
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            return item

    def wake(self) -> None:
        """Wake a waiting ``take`` (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()


class DropOldestQueue(Generic[T]):
    """Bounded FIFO; ``put`` on a full queue drops the oldest item and never blocks."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize {maxsize} must be >= 1")
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.dropped = 0
        self._closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float) -> T | None:
        """The oldest item, or ``None`` after ``timeout`` seconds (or once closed and empty)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Wake waiters; later ``get`` calls return what is left, then ``None`` at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        """Block until the queue is empty or ``timeout`` passes; True when empty."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True
