"""The ControlNets' own sources: a source thread each, newest frame wins, each with its own loss handling."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bridges.base import FrameSource
from engine.runtime.loss import OnLossMode
from engine.runtime.queues import LatestSlot
from engine.runtime.stats import RuntimeStats
from engine.runtime.switching import Failed, InputSwitch, Ready, swap_into
from engine.runtime.workers import InputHealth, InputItem, SourceWorker, make_preprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlSource:
    """Where one ControlNet's frames come from (a ``model.controlnets[index].source`` bridge).

    ``on_loss``: ``hold`` keeps conditioning on its last frame while the source is gone;
    ``black`` conditions on a black frame until it is back.
    """

    index: int
    open_source: Callable[[], FrameSource]
    label: str
    on_loss: OnLossMode = OnLossMode.HOLD
    retry_seconds: float = 1.0
    stall_seconds: float = 2.0


class LossWatch:
    """Says once when a second source goes (lost or stalled) and once when it is back.

    ``gone`` is True exactly once per loss: the moment the owner applies its ``on_loss``.
    """

    def __init__(self, what: str, on_loss: OnLossMode, holding: str, black: str) -> None:
        self.what = what
        self.on_loss = on_loss
        self._doing = black if on_loss is OnLossMode.BLACK else holding
        self.lost = False

    def seen(self) -> None:
        """A new frame arrived."""
        if self.lost:
            logger.info("%s is back", self.what)
        self.lost = False

    def gone(self, worker: SourceWorker, stall_seconds: float) -> bool:
        """No new frame: whether the source has just now gone (logged once)."""
        if self.lost or worker.health(time.monotonic(), stall_seconds) is InputHealth.LIVE:
            return False
        self.lost = True
        logger.warning("%s is gone: %s", self.what, self._doing)
        return True


class ControlFeeds:
    """One ``SourceWorker`` per ControlNet source; ``take`` gives the loop each one's newest frame.

    Frames are converted on the source threads to ``(1, 3, H, W)`` in [-1, 1] at the pipeline's
    current size (``size()``), like the main input. The workers count into their own stats, so
    the engine's input figures stay the main input's.
    """

    def __init__(
        self,
        sources: Sequence[ControlSource],
        count: int,
        size: Callable[[], tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype,
        stop: threading.Event,
    ) -> None:
        self.sources = list(sources)
        self.count = count
        self._size = size
        self._device, self._dtype = device, dtype
        self._slots: list[LatestSlot[InputItem]] = [LatestSlot() for _ in self.sources]
        self._watches = [
            LossWatch(
                f"ControlNet {s.index} source {s.label}",
                s.on_loss,
                "holding its last frame",
                "conditioning on black",
            )
            for s in self.sources
        ]
        preprocess = make_preprocess(size, device, dtype)
        self.workers = []
        self.switches: list[InputSwitch] = []
        for source, slot in zip(self.sources, self._slots):
            worker = SourceWorker(
                source.open_source, slot, preprocess, RuntimeStats(), stop, source.retry_seconds
            )
            worker.name = f"latentstage-control-{source.index}"
            self.workers.append(worker)
            label = f"control-{source.index}-next"
            self.switches.append(InputSwitch(preprocess, stop, source.retry_seconds, label))

    def select(self, index: int, name: str, open_source: Callable[[], FrameSource]) -> None:
        """Switch ControlNet ``index``'s own source to ``name`` (``InputSwitch``); a ValueError when
        that ControlNet has no source of its own."""
        self.switches[self._position(index)].start(name, open_source)

    def waiting(self, index: int) -> str | None:
        return self.switches[self._position(index)].waiting

    def poll(self) -> list[tuple[int, Ready | Failed]]:
        """Switches that completed or failed since the last poll, by ControlNet index; a completed
        one already feeds its ControlNet."""
        outcomes: list[tuple[int, Ready | Failed]] = []
        for position, (source, switch) in enumerate(zip(self.sources, self.switches)):
            outcome = switch.poll()
            if isinstance(outcome, Ready):
                self.workers[position] = swap_into(
                    self._slots[position], self.workers[position], outcome.candidate, switch
                )
            if outcome is not None:
                outcomes.append((source.index, outcome))
        return outcomes

    def threads(self) -> list[SourceWorker]:
        return [*self.workers, *(w for switch in self.switches for w in switch.threads())]

    def _position(self, index: int) -> int:
        for position, source in enumerate(self.sources):
            if source.index == index:
                return position
        own = ", ".join(str(s.index) for s in self.sources) or "none"
        raise ValueError(
            f"ControlNet {index} has no source of its own (model.controlnets[{index}].source); allowed: {own}"
        )

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def take(self) -> list[torch.Tensor | None] | None:
        """Per ControlNet: its newest frame, or ``None`` (nothing new: the last one stays)."""
        if not self.sources:
            return None
        frames: list[torch.Tensor | None] = [None] * self.count
        for source, slot, worker, watch in zip(self.sources, self._slots, self.workers, self._watches):
            item = slot.take(timeout=0.0)
            if item is not None:
                watch.seen()
                frames[source.index] = item.tensor
            elif watch.gone(worker, source.stall_seconds) and source.on_loss is OnLossMode.BLACK:
                height, width = self._size()
                frames[source.index] = torch.full(
                    (1, 3, height, width), -1.0, device=self._device, dtype=self._dtype
                )
        return frames
