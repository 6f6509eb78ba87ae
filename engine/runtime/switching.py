"""Live input switching: the next source opens on its own thread while the current one plays.

``InputSwitch`` owns the candidate: a ``SourceWorker`` that tries its source once (a source that
cannot open is refused, not retried) and puts its frames into a staging slot. The frame loop
polls it between two frames (``poll``): when the candidate has delivered its first frame, the
engine swaps it in (``Engine._swap_input``); when it failed, or delivered nothing within
``timeout_s``, the switch is refused and the current source plays on. A newer switch replaces a
waiting one. ``Crossfade`` blends the old input's last frame into the new input over N frames, in
pixel space, on the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bridges.base import Frame, FrameSource
from engine.runtime.queues import LatestSlot
from engine.runtime.stats import RuntimeStats
from engine.runtime.workers import InputItem, SourceWorker

logger = logging.getLogger(__name__)

SWITCH_TIMEOUT_S = 10.0
"""A switched-to source that opened but sent no frame for this long is refused."""


@dataclass
class Candidate:
    """The source being switched to: its name, worker and staging slot."""

    name: str
    worker: SourceWorker
    slot: LatestSlot[InputItem]
    started_at: float


@dataclass(frozen=True)
class Ready:
    candidate: Candidate


@dataclass(frozen=True)
class Failed:
    name: str
    reason: str


class InputSwitch:
    """The waiting switch of one input (see the module docstring).

    The candidate's worker is a ``SourceWorker`` with one try, pre-processing with ``preprocess``,
    counting into ``stats`` (a fresh one: a second source's figures stay apart from the main
    input's), stopped with ``stop``; ``label`` names its thread.
    """

    def __init__(
        self,
        preprocess: Callable[[Frame], InputItem],
        stop: threading.Event,
        retry_s: float,
        label: str,
        stats: RuntimeStats | None = None,
        timeout_s: float = SWITCH_TIMEOUT_S,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._preprocess = preprocess
        self._stop = stop
        self._retry_s = retry_s
        self._label = label
        self._stats = stats
        self.timeout_s = timeout_s
        self._now = now
        self.candidate: Candidate | None = None
        self.retired: list[SourceWorker] = []  # halted workers (their threads close their sources)

    @property
    def waiting(self) -> str | None:
        """The name being switched to, or ``None``."""
        return None if self.candidate is None else self.candidate.name

    def start(self, name: str, open_source: Callable[[], FrameSource]) -> None:
        """Open ``name`` on its own thread; a switch still waiting is dropped (the newest wins)."""
        self.cancel()
        slot: LatestSlot[InputItem] = LatestSlot()
        stats = RuntimeStats() if self._stats is None else self._stats
        worker = SourceWorker(
            open_source, slot, self._preprocess, stats, self._stop, self._retry_s,
            one_try=True, label=self._label,
        )  # fmt: skip
        self.candidate = Candidate(name, worker, slot, self._now())
        worker.start()

    def cancel(self) -> None:
        if self.candidate is not None:
            self.retire(self.candidate.worker)
            self.candidate = None

    def retire(self, worker: SourceWorker) -> None:
        worker.halt()
        self.retired.append(worker)
        self.retired = [w for w in self.retired if w.is_alive() or w is worker]

    def poll(self) -> Ready | Failed | None:
        """What became of the waiting switch since the last poll (``None``: still waiting, or none)."""
        candidate = self.candidate
        if candidate is None:
            return None
        worker = candidate.worker
        if worker.first_frame.is_set():
            self.candidate = None
            return Ready(candidate)
        reason = worker.failed
        if reason is None and not worker.is_alive():
            reason = "its source ended before a frame"
        if reason is None and self._now() - candidate.started_at > self.timeout_s:
            reason = f"it sent no frame in {self.timeout_s:g} s"
        if reason is None:
            return None
        self.cancel()
        return Failed(candidate.name, reason)

    def threads(self) -> list[SourceWorker]:
        """Every worker still to join at shutdown (the candidate and the retired ones)."""
        waiting = [] if self.candidate is None else [self.candidate.worker]
        return [*waiting, *self.retired]


def swap_into(
    slot: LatestSlot[InputItem], old: SourceWorker, candidate: Candidate, switch: InputSwitch
) -> SourceWorker:
    """Between two frames: 1. the old worker stops putting frames (none of its frames after this),
    2. its frame waiting in ``slot`` goes, 3. the candidate's first frame takes its place and its
    worker feeds ``slot``; the old worker closes its source on its own thread. The new worker."""
    switch.retire(old)  # 1.
    slot.take(0)  # 2.
    first = candidate.slot.take(0)  # 3.
    if first is not None:
        slot.put(first)
    candidate.worker.retarget(slot)
    return candidate.worker


class Crossfade:
    """The old input's last frame ``(1, 3, H, W)`` fading out over ``frames`` new frames."""

    def __init__(self, old: torch.Tensor, frames: int) -> None:
        self.old = old
        self.frames = frames
        self.done = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.frames

    def blend(self, new: torch.Tensor) -> torch.Tensor:
        """The next frame: ``old`` weighted (frames - k) / (frames + 1), k = 1, 2, ...; a new size
        (a resolution change) ends the fade."""
        if new.shape != self.old.shape:
            self.done = self.frames
            return new
        self.done += 1
        weight = self.done / (self.frames + 1)
        return torch.lerp(self.old, new, weight)
