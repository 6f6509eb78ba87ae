"""The runtime's threads around the engine loop: source, post-processing and one per sink."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from bridges.base import BridgeError, BridgeUnavailable, Frame, FrameSink, FrameSource, SourceClosed
from bridges.ratelimit import RateLimitedLog
from engine.control.state import ControlState
from engine.imageops import frame_to_tensor, tensor_to_frame, upsample
from engine.params import ParamError
from engine.prompting import PromptEncoder
from engine.runtime.queues import DropOldestQueue, LatestSlot
from engine.runtime.stats import RuntimeStats

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
POLL_S = 0.1


@dataclass
class InputItem:
    """A received frame, pre-processed on the source thread.

    ``tensor`` is ``(1, 3, H, W)`` in [-1, 1] on the pipeline's device and dtype.
    """

    tensor: torch.Tensor
    frame: Frame


class OutputKind(str, Enum):
    TENSOR = "tensor"  # a pipeline output (1, 3, H, W) in [-1, 1]
    FRAME = "frame"  # a ready frame (bypass, black, passthrough)
    REPEAT = "repeat"  # send the last output frame again (hold, pause, error)


@dataclass(frozen=True)
class ChangeStamp:
    """The latest committed change: its number (1, 2, ...) and ``time.monotonic()`` of its commit."""

    number: int
    committed_at: float


@dataclass
class OutputItem:
    """What the engine loop hands to post-processing."""

    kind: OutputKind
    timestamp: float
    tensor: torch.Tensor | None = None
    frame: Frame | None = None
    measure_latency: bool = True
    source: Frame | None = None  # the input frame it was made from (the operator page shows it)
    change: ChangeStamp | None = None  # the latest change this output carries (None: it may not)


@dataclass
class SinkItem:
    """A frame on its way to one sink; latency is measured from ``frame.timestamp``."""

    frame: Frame
    measure_latency: bool
    source: Frame | None = None
    change: ChangeStamp | None = None


class InputHealth(str, Enum):
    """Whether the source is delivering frames (what ``input.on_loss`` reacts to)."""

    LIVE = "live"
    STALLED = "stalled"  # connected, but no new frame for ``input.stall_seconds``
    LOST = "lost"  # not connected (unplugged, closed, failing to open)


class SourceWorker(threading.Thread):
    """Receives frames, pre-processes them and puts the newest into the input slot.

    A source that fails or disappears is closed and reopened with exponential backoff
    (``retry_s`` doubling up to 10 s); the output stays alive meanwhile (the engine loop
    applies ``on_loss``). A source that stays connected but sends nothing new (a frozen
    TouchDesigner, a shared-memory writer that stopped writing) counts as stalled after
    ``stall_s`` seconds (``health``) and resumes by itself with its next frame.
    """

    def __init__(
        self,
        open_source: Callable[[], FrameSource],
        slot: LatestSlot[InputItem] | None,
        preprocess: Callable[[Frame], InputItem],
        stats: RuntimeStats,
        stop: threading.Event,
        retry_s: float = 1.0,
        one_try: bool = False,
        label: str = "",
    ) -> None:
        super().__init__(name="latentstage-source" + (f"-{label}" if label else ""), daemon=True)
        self._open = open_source
        self._slot = slot
        self._slot_lock = threading.Lock()
        self._one_try = one_try
        self._halt = threading.Event()
        self.failed: str | None = None  # one_try: why the first open failed
        self.first_frame = threading.Event()
        self._preprocess = preprocess
        self._stats = stats
        self._stop_event = stop
        self._retry_s = retry_s
        self._source: FrameSource | None = None
        self._last_sequence: int | None = None
        self._log = RateLimitedLog(logger, 5.0)
        self.ended = threading.Event()
        self.fatal: str | None = None
        self.last_frame_at = time.monotonic()  # the last new frame, or the (re)connection

    def retarget(self, slot: LatestSlot[InputItem] | None) -> None:
        """Put frames into ``slot`` from now on (``None``: drop them). Once this returns, no
        frame goes to the old slot any more (a switch relies on it)."""
        with self._slot_lock:
            self._slot = slot

    def halt(self) -> None:
        """Stop this worker only (the input was switched away): it closes its source within one
        receive (``POLL_S``) and puts nothing anywhere meanwhile."""
        self.retarget(None)
        self._halt.set()

    @property
    def halted(self) -> bool:
        return self._halt.is_set()

    def health(self, now: float, stall_s: float) -> InputHealth:
        """LOST while disconnected; STALLED after ``stall_s`` s without a new frame (0: never)."""
        if self._source is None:
            return InputHealth.LOST
        if stall_s > 0 and now - self.last_frame_at >= stall_s:
            return InputHealth.STALLED
        return InputHealth.LIVE

    def run(self) -> None:
        backoff = self._retry_s
        try:
            while not (self._stop_event.is_set() or self._halt.is_set()):
                if self._source is None:
                    if not self._connect():
                        if self._one_try:
                            return
                        self._stop_event.wait(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF_S)
                        continue
                    backoff = self._retry_s
                self._receive_one()
        finally:
            self._close_source()

    def _connect(self) -> bool:
        try:
            source = self._open()
        except BridgeUnavailable as err:
            if self._one_try:
                self.failed = str(err)
                return False
            self.fatal = str(err)
            logger.error("input cannot run here: %s", err)
            self._stop_event.wait(MAX_BACKOFF_S)
            return False
        except (BridgeError, OSError, ValueError) as err:
            if self._one_try:
                self.failed = str(err)
                return False
            self._log(logging.WARNING, "open", "input not available (%s); retrying", err)
            return False
        logger.info("input connected: %s", source)
        self.last_frame_at = time.monotonic()  # the stall clock starts at the connection
        self._source = source
        self._stats.source_connected = True
        self._last_sequence = None
        return True

    def _receive_one(self) -> None:
        assert self._source is not None
        try:
            frame = self._source.recv(POLL_S)
        except SourceClosed as err:
            logger.info("input ended: %s", err)
            self._close_source()
            self.ended.set()
            self._stop_event.wait(MAX_BACKOFF_S)
            return
        except (BridgeError, OSError) as err:
            self._log(logging.WARNING, "lost", "input lost (%s); reconnecting", err)
            self._close_source()
            return
        if frame is None:
            return
        if self._last_sequence is not None and frame.sequence > self._last_sequence + 1:
            self._stats.input_dropped += frame.sequence - self._last_sequence - 1
        self._last_sequence = frame.sequence
        now = time.monotonic()
        self.last_frame_at = now
        item = self._preprocess(frame)
        with self._slot_lock:
            if self._slot is None:
                return
            self._stats.input_frame(now)
            self._slot.put(item)
        self.first_frame.set()

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if not self._halt.is_set():
            self._stats.source_connected = False
        _close_bridge(source, "the input")


class SinkWorker(threading.Thread):
    """Sends frames to one output from its own drop-oldest queue.

    A stalled receiver only fills this queue (the oldest frame is dropped), never the
    others'. A sink that raises is logged, closed and reopened with backoff.
    """

    def __init__(
        self,
        label: str,
        open_sink: Callable[[], FrameSink],
        queue_size: int,
        stats: RuntimeStats,
        stop: threading.Event,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__(name=f"latentstage-sink-{label}", daemon=True)
        self.label = label
        self.queue: DropOldestQueue[SinkItem] = DropOldestQueue(queue_size)
        self._open = open_sink
        self._stats = stats
        self._counters = stats.sink(label)
        self._stop_event = stop
        self._retry_s = retry_s
        self._backoff = retry_s
        self._retry_at = 0.0
        self._sink: FrameSink | None = None
        self._log = RateLimitedLog(logger, 5.0)
        self._idle = threading.Event()
        self._idle.set()
        self.sink_opened = threading.Event()
        self._ended_at: float | None = None
        self._shown_change = 0  # the newest change this output has sent a frame of

    def show_ended(self, at: float) -> None:
        """The show ended at ``at`` (``time.monotonic()``): a sink that keeps a timeline (a
        recording, ``hold_until``) ends it there, not when its thread gets to close it."""
        self._ended_at = at

    def put(self, item: SinkItem) -> None:
        self._idle.clear()
        self.queue.put(item)
        self._counters.dropped = self.queue.dropped

    def drain(self, timeout: float) -> bool:
        """Wait until every queued frame was sent (or failed); True when drained."""
        return self._idle.wait(timeout)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self._sink is None and time.monotonic() >= self._retry_at and not self._connect():
                    self._back_off()
                item = self.queue.get(POLL_S)
                if item is None:
                    if not len(self.queue):
                        self._idle.set()
                    continue
                if self._sink is None:
                    continue  # not connected: the frame is dropped, the engine goes on
                self._send(item)
                if not len(self.queue):
                    self._idle.set()
        finally:
            self._idle.set()
            self._close_sink()

    def open_now(self) -> None:
        """Open the sink on the caller's thread (start-up check); raises what opening raises."""
        self._sink = self._open()
        self._counters.connected = True
        self.sink_opened.set()

    def _connect(self) -> bool:
        try:
            self._sink = self._open()
        except (BridgeError, BridgeUnavailable, OSError, ValueError) as err:
            self._log(logging.WARNING, "open", "output %s not available (%s); retrying", self.label, err)
            return False
        self._counters.connected = True
        self.sink_opened.set()
        return True

    def _back_off(self) -> None:
        """The next open waits ``backoff`` seconds, and the one after twice as long (to 10 s)."""
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _send(self, item: SinkItem) -> None:
        assert self._sink is not None
        try:
            show_input = getattr(self._sink, "send_input", None)  # the preview's operator page
            if show_input is not None and item.source is not None:
                show_input(item.source)
            self._sink.send(item.frame)
        # A sink is third-party I/O (SDKs, sockets, encoders): whatever it raises must not
        # take the engine down. Log it with its traceback, reopen, keep the others running.
        except Exception as err:
            self._counters.failures += 1
            self._log(logging.ERROR, "send", "output %s failed: %s; reopening", self.label, err)
            self._close_sink()
            # a sink that opens but cannot send (a file that cannot be created) is reopened
            # with the same backoff as one that cannot open, not once per frame
            self._back_off()
            return
        self._backoff = self._retry_s
        self._counters.sent += 1
        now = time.monotonic()
        if item.measure_latency:
            self._stats.latency(1000.0 * (now - item.frame.timestamp))
        change = item.change
        if change is not None and change.number > self._shown_change:  # the first frame carrying it
            self._shown_change = change.number
            self._stats.change_shown(self.label, 1000.0 * (now - change.committed_at))

    def _close_sink(self) -> None:
        sink, self._sink = self._sink, None
        self._counters.connected = False
        hold_until = getattr(sink, "hold_until", None)  # the record sink's timeline
        if hold_until is not None and self._ended_at is not None:
            hold_until(self._ended_at)
        _close_bridge(sink, f"output {self.label}")


class PostProcessor(threading.Thread):
    """Turns engine outputs into uint8 RGBA frames once (upsampled ``scale`` times) and fans them
    out to every sink."""

    def __init__(
        self, sinks: list[SinkWorker], stats: RuntimeStats, stop: threading.Event, scale: int = 1
    ) -> None:
        super().__init__(name="latentstage-post", daemon=True)
        self.scale = scale
        self.queue: DropOldestQueue[OutputItem] = DropOldestQueue(2)
        self._sinks = sinks
        self._stats = stats
        self._stop_event = stop
        self._last: Frame | None = None
        self._sequence = 0
        self._idle = threading.Event()
        self._idle.set()

    def put(self, item: OutputItem) -> None:
        self._idle.clear()
        self.queue.put(item)

    def drain(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def run(self) -> None:
        while not self._stop_event.is_set():
            item = self.queue.get(POLL_S)
            if item is None:
                if not len(self.queue):
                    self._idle.set()
                continue
            frame = self._convert(item)
            if frame is not None:
                self._stats.output_frame(time.monotonic())
                for sink in self._sinks:
                    sink.put(SinkItem(frame, item.measure_latency, item.source, item.change))
            if not len(self.queue):
                self._idle.set()
        self._idle.set()

    @property
    def last_frame(self) -> Frame | None:
        return self._last

    def _convert(self, item: OutputItem) -> Frame | None:
        if item.kind is OutputKind.REPEAT:
            if self._last is None:
                return None
            pixels = self._last.pixels
        elif item.kind is OutputKind.FRAME:
            assert item.frame is not None
            pixels = item.frame.pixels
        else:
            assert item.tensor is not None
            pixels = tensor_to_frame(upsample(item.tensor, self.scale)).cpu().numpy()
        self._sequence += 1
        frame = Frame(pixels, item.timestamp, self._sequence)
        self._last = frame
        return frame


class PromptWorker(threading.Thread):
    """Encodes prompt (and IP-Adapter image) changes off the frame loop, then releases them.

    The embeddings land in the pipeline's prompt and image caches, so applying the change at
    the next frame boundary costs no encoder call on the frame loop.
    """

    def __init__(
        self,
        control: ControlState,
        prompts: PromptEncoder,
        stop: threading.Event,
        report_error: Callable[[str], None],
        images: Callable[[str], object] | None = None,
    ) -> None:
        super().__init__(name="latentstage-prompts", daemon=True)
        self._control = control
        self._prompts = prompts
        self._images = images
        self._stop_event = stop
        self._report_error = report_error

    def run(self) -> None:
        while not self._stop_event.is_set():
            taken = self._control.take_for_encoding(POLL_S)
            if taken is not None and self._encode(taken[0]):
                self._control.release_encoded(*taken)
            held = self._control.take_to_warm()
            while held is not None:  # a change held for a beat: its prompts cached ahead of time
                if self._encode(held.changes):
                    self._control.warmed(held)
                held = self._control.take_to_warm()

    def _encode(self, changes: dict[str, Any]) -> bool:
        """Put the prompts and image of ``changes`` into the caches; False (reported) if refused."""
        texts = [changes.get("prompt"), changes.get("negative_prompt")]
        texts += [prompt for prompt, _ in changes.get("prompt_blend") or []]
        image = changes.get("ip_adapter_image")
        try:
            for text in texts:
                if text is not None:
                    self._prompts.encode(text)
            if image is not None and self._images is not None:
                self._images(image)  # the IP-Adapter reference image, into its cache
        except ParamError as err:  # e.g. no such image file: refused, the state kept
            self._report_error(str(err))
            return False
        # the encoders are model calls: out of memory or a device error must be
        # reported and must not kill the worker; the change is dropped, the state kept
        except RuntimeError as err:
            self._report_error(f"prompt: encoding failed: {err}")
            return False
        return True


def make_preprocess(
    size: Callable[[], tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> Callable[[Frame], InputItem]:
    """Frame (uint8 RGBA, any size) → InputItem with a ``(1, 3, height, width)`` tensor.

    ``size()`` gives the current ``(height, width)``; it is asked per frame, so the input
    follows a live resolution change.
    """

    def preprocess(frame: Frame) -> InputItem:
        height, width = size()
        pixels = torch.from_numpy(np.ascontiguousarray(frame.pixels)).to(device, non_blocking=True)
        return InputItem(frame_to_tensor(pixels, height, width, dtype), frame)

    return preprocess


def black_frame(height: int, width: int, timestamp: float) -> Frame:
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    return Frame(pixels, timestamp)


def _close_bridge(bridge: FrameSource | FrameSink | None, what: str) -> None:
    """Close ``bridge`` if there is one; a failure is logged (the loop goes on without it)."""
    if bridge is None:
        return
    try:
        bridge.close()
    except (BridgeError, OSError) as err:
        logger.warning("closing %s failed: %s", what, err)
