"""The IP-Adapter's own source: a bridge's newest frame encoded as the reference image, off the frame loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bridges.base import FrameSource
from engine.runtime.control_sources import LossWatch
from engine.runtime.loss import OnLossMode
from engine.runtime.queues import LatestSlot
from engine.runtime.stats import RuntimeStats
from engine.runtime.switching import Failed, InputSwitch, Ready, swap_into
from engine.runtime.workers import InputItem, SourceWorker, make_preprocess

logger = logging.getLogger(__name__)

REFERENCE_SIDE = 224  # frames are scaled to this square first; the encoder resizes to its own input


@dataclass(frozen=True)
class ReferenceSource:
    """Where the IP-Adapter reference frames come from (``model.ip_adapter.source``).

    ``refresh_seconds``: the newest frame is encoded at most this often. ``on_loss``: ``hold``
    keeps steering by the last frame while the source is gone; ``black`` steers by a black frame.
    """

    open_source: Callable[[], FrameSource]
    label: str
    refresh_seconds: float = 0.5
    on_loss: OnLossMode = OnLossMode.HOLD
    retry_seconds: float = 1.0
    stall_seconds: float = 2.0


class ReferenceFeed:
    """A source thread (newest frame wins) and an encoder thread; ``take`` gives the loop new tokens.

    The encoder thread wakes every ``refresh_seconds``, encodes the newest frame with
    ``encode`` (``(1, 3, H, W)`` in [-1, 1] → tokens ``(1, T, D)``) and leaves the tokens for the
    frame loop, which only swaps them in (``StreamPipeline.set_reference_tokens``). An encoder
    failure is logged and the last reference stays.
    """

    def __init__(
        self,
        source: ReferenceSource,
        encode: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        stop: threading.Event,
    ) -> None:
        self.source = source
        self._encode = encode
        self._frames: LatestSlot[InputItem] = LatestSlot()
        self._tokens: LatestSlot[torch.Tensor] = LatestSlot()
        self._stop = stop
        self._watch = LossWatch(
            f"IP-Adapter source {source.label}",
            source.on_loss,
            "keeping the last reference",
            "steering by a black frame",
        )
        self.encodes = 0
        preprocess = make_preprocess(lambda: (REFERENCE_SIDE, REFERENCE_SIDE), device, dtype)
        self.reader = SourceWorker(
            source.open_source, self._frames, preprocess, RuntimeStats(), stop, source.retry_seconds
        )
        self.reader.name = "latentstage-ip-source"
        self.switch = InputSwitch(preprocess, stop, source.retry_seconds, "ip-next")
        self.encoder = threading.Thread(target=self._run, name="latentstage-ip-encoder", daemon=True)
        self._black = torch.full((1, 3, REFERENCE_SIDE, REFERENCE_SIDE), -1.0, device=device, dtype=dtype)

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        return self.reader, self.encoder, *self.switch.threads()

    def select(self, name: str, open_source: Callable[[], FrameSource]) -> None:
        """Switch the reference source to ``name`` (``InputSwitch``: the old one feeds meanwhile)."""
        self.switch.start(name, open_source)

    def poll(self) -> Ready | Failed | None:
        """A switch that completed (the new source already feeds the encoder) or failed."""
        outcome = self.switch.poll()
        if isinstance(outcome, Ready):
            self.reader = swap_into(self._frames, self.reader, outcome.candidate, self.switch)
        return outcome

    def start(self) -> None:
        self.reader.start()
        self.encoder.start()

    def take(self) -> torch.Tensor | None:
        """The newest tokens since the last call, or ``None`` (nothing new: the last ones stay)."""
        return self._tokens.take(timeout=0.0)

    def wake(self) -> None:
        self._frames.wake()

    # ------------------------------------------------------------------ the encoder thread
    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            item = self._frames.take(timeout=self.source.refresh_seconds)
            if self._stop.is_set():
                return
            image = self._image(item)
            if image is not None:
                self._encode_one(image)
            self._stop.wait(max(0.0, self.source.refresh_seconds - (time.monotonic() - started)))

    def _image(self, item: InputItem | None) -> torch.Tensor | None:
        """The frame to encode now: a new one, a black one once the source is lost (``black``)."""
        if item is not None:
            self._watch.seen()
            return item.tensor
        if (
            self._watch.gone(self.reader, self.source.stall_seconds)
            and self.source.on_loss is OnLossMode.BLACK
        ):
            return self._black
        return None

    def _encode_one(self, image: torch.Tensor) -> None:
        try:
            tokens = self._encode(image)
        except RuntimeError as err:  # e.g. out of memory: the last reference stays, the show goes on
            logger.error("IP-Adapter reference frame could not be encoded (%s); keeping the last one", err)
            return
        self.encodes += 1
        self._tokens.put(tokens)
