"""The engine process: opens bridges, runs the frame loop, owns every thread and resource."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from bridges.base import Frame, FrameSink, FrameSource, open_sink, open_source
from bridges.ratelimit import RateLimitedLog
from engine.accel.backends import Backend
from engine.control.state import ControlState
from engine.extensions.ip_adapter import IpAdapter
from engine.models.bundle import ModelBundle
from engine.params import (
    ENCODED_PARAMS,
    FRAME_PARAMS,
    LIVE_PARAMS,
    MAX_CONTROLNETS,
    REGISTRY,
    RUNTIME_PARAMS,
    SHAPE_PARAMS,
    ParamError,
    config_values,
    validate_changes,
)
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.builds import Builds
from engine.runtime.changes import apply_change, open_pipeline, ready_runners
from engine.runtime.control_sources import ControlFeeds, ControlSource
from engine.runtime.inputs import SourceNames, source_spec
from engine.runtime.loss import OnLossMode
from engine.runtime.music import Music, MusicSettings
from engine.runtime.queues import LatestSlot
from engine.runtime.reference_source import ReferenceFeed, ReferenceSource
from engine.runtime.replicas.coordinator import Made, ReplicaSet, ReplicaSettings
from engine.runtime.replicas.worker import weights_fingerprint
from engine.runtime.stats import EngineState, RuntimeStats
from engine.runtime.switching import Candidate, Crossfade, Failed, InputSwitch, Ready, swap_into
from engine.runtime.workers import (
    ChangeStamp,
    InputHealth,
    InputItem,
    OutputItem,
    OutputKind,
    PostProcessor,
    PromptWorker,
    SinkWorker,
    SourceWorker,
    black_frame,
    make_preprocess,
)
from engine.stream.feedback import Feedback, FeedbackTransform
from engine.stream.modes import GenerationMode

logger = logging.getLogger(__name__)


KEEPALIVE_FPS = 30.0
SHUTDOWN_BUDGET_S = 1.5
LEAD_REFRESH_S = 0.5
SOURCE_KEYS = (
    "input_source",
    *(f"controlnet_source_{index}" for index in range(MAX_CONTROLNETS)),
    "ip_adapter_source",
)
"""The registry keys that switch a source live (applied once the new source sent a frame)."""
_ON_LOSS_WORDS = {
    OnLossMode.HOLD: "hold the last frame",
    OnLossMode.BLACK: "show black",
    OnLossMode.PASSTHROUGH: "show the last input frame",
}


def sink_spec(output_config: Any) -> tuple[str, dict[str, Any]]:
    """Bridge name and constructor options from one validated ``outputs`` entry."""
    return output_config.type, output_config.model_dump(mode="json", exclude={"type", "queue_size"})


@dataclass
class EngineOptions:
    """How the runtime behaves around the pipeline (from ``input`` / ``outputs`` config)."""

    on_loss: OnLossMode = OnLossMode.HOLD
    retry_seconds: float = 1.0
    stall_seconds: float = 2.0  # no new frame this long = lost (0: never)
    keepalive_fps: float = KEEPALIVE_FPS  # the fastest rate on_loss frames are sent at
    sink_queue_sizes: list[int] = field(default_factory=list)
    output_scale: int = 1  # outputs upsampled by this factor (bilinear) on the post thread
    runtime_values: dict[str, Any] = field(default_factory=dict)  # tempo, modulators... from the config


class Engine:
    """Runs one StreamPipeline between one source and any number of sinks.

    Threads (DESIGN.md): the source thread pre-processes into a newest-wins slot; the
    engine loop (``run``, on the caller's thread) applies parameter changes at frame
    boundaries and calls the pipeline; a post-processing thread converts outputs once; one
    thread per sink sends from its own drop-oldest queue. ``close()`` stops and releases
    everything and is safe to call twice.

    Args:
        pipeline: the StreamPipeline to run (its models already loaded).
        open_source: opens the frame source (called again after a loss, with backoff).
        sink_openers: one ``(label, opener)`` per output.
        options: loss handling, retries, queue sizes.
        backend: gives the runners of new shapes (built in the background) and is closed with
            the engine; ``None``: the pipeline's torch runners serve every shape.
        control_sources: the ControlNets that have their own source (a thread each).
        reference_source: the IP-Adapter's reference frames from a bridge (``None``: a file).
        music_settings: the tempo source and audio input (``None``: an internal clock, no audio).
        source_names: opens sources by name for ``/input/select`` (``None``: the input is fixed).
        replicas: replicas of the pipeline in processes of their own (``scale.replicas`` > 1): the
            frame loop hands them the frames round-robin and sends out what they made in input
            order; ``pipeline`` then runs no frame: it checks and commits every change (what the
            replicas are sent) and holds the state.
    """

    def __init__(
        self,
        pipeline: StreamPipeline,
        open_source: Callable[[], FrameSource],
        sink_openers: list[tuple[str, Callable[[], FrameSink]]],
        options: EngineOptions | None = None,
        stats: RuntimeStats | None = None,
        control: ControlState | None = None,
        backend: Backend | None = None,
        control_sources: Sequence[ControlSource] = (),
        reference_source: ReferenceSource | None = None,
        music_settings: MusicSettings | None = None,
        source_names: SourceNames | None = None,
        replicas: ReplicaSet | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.replicas = replicas
        self._replica_output: torch.Tensor | None = None  # the newest output a replica made
        self._controls: list[torch.Tensor | None] = []  # the ControlNets' own sources' newest frames
        self._reference: torch.Tensor | None = None  # the IP-Adapter source's newest tokens
        self.source_names = source_names
        self.backend = backend
        self.options = options or EngineOptions()
        self.stats = stats or RuntimeStats()
        self._stop = threading.Event()
        self._slot: LatestSlot[InputItem] = LatestSlot()
        sizes = self.options.sink_queue_sizes or [2] * len(sink_openers)
        self.sinks = [
            SinkWorker(label, opener, size, self.stats, self._stop, self.options.retry_seconds)
            for (label, opener), size in zip(sink_openers, sizes, strict=True)
        ]
        self.post = PostProcessor(self.sinks, self.stats, self._stop, self.options.output_scale)
        self._size = (pipeline.height, pipeline.width)  # one tuple: read whole by the source thread
        self._preprocess = make_preprocess(lambda: self._size, pipeline.device, pipeline.dtype)
        self.source = SourceWorker(
            open_source,
            self._slot,
            self._preprocess,
            self.stats,
            self._stop,
            self.options.retry_seconds,
        )
        retry_s = self.options.retry_seconds
        self.switch = InputSwitch(self._preprocess, self._stop, retry_s, "next", self.stats)
        self._crossfade: Crossfade | None = None
        self.control_feeds = ControlFeeds(
            control_sources,
            len(pipeline.settings.controlnets),
            lambda: self._size,
            pipeline.device,
            pipeline.dtype,
            self._stop,
        )
        self.reference_feed = None
        adapter = pipeline.extensions.get("ip_adapter")
        image_prompts = adapter.image_prompts if isinstance(adapter, IpAdapter) else None
        if reference_source is not None:
            if image_prompts is None or not pipeline.settings.ip_adapter_from_source:
                raise ValueError("reference_source needs a pipeline with model.ip_adapter.source")
            self.reference_feed = ReferenceFeed(
                reference_source,
                image_prompts.adapter.encode_image,
                pipeline.device,
                pipeline.dtype,
                self._stop,
            )
        self.control = control or ControlState()
        self._lead, self._lead_at = 0.0, 0.0  # the cached change latency (_lead_s)
        self.runtime_state: dict[str, Any] = {name: REGISTRY[name].default for name in RUNTIME_PARAMS}
        self.runtime_state.update(validate_changes(self.options.runtime_values, RUNTIME_PARAMS))
        self.music = Music(music_settings or MusicSettings(), self.control, self._lead_s)
        self.music.apply(self.runtime_state, time.monotonic())
        self._modulated: dict[str, Any] = {}  # what the modulators last committed
        self.feedback = Feedback()  # the feedback loop's device buffers
        self._feedback_ready = False  # whether the pipeline's last output may be fed back
        self._played: dict[str, Any] = {}  # the per-frame values playing (base or modulated)
        self._feedback_amount, self._feedback_transform = 0.0, FeedbackTransform()
        self._play({name: self.runtime_state[name] for name in FRAME_PARAMS})
        self.control.mark_applied({**pipeline.state, **self.runtime_state})
        applied = self.control.applied()
        self._base = {name: applied.get(name) for name in self.music.targets}  # what they modulate
        images = None if image_prompts is None else image_prompts.tokens
        self.prompt_worker = PromptWorker(
            self.control, pipeline.prompts, self._stop, self._report_error, images
        )
        self._transition: tuple[torch.Tensor, float, float] | None = None
        self._change: ChangeStamp | None = None  # the latest committed change
        self.builds = None if backend is None else Builds(backend, self._slot.wake, self._report_error)
        self._log = RateLimitedLog(logger, 1.0)
        self._last_input: InputItem | None = None
        self._input_health = InputHealth.LIVE
        self._missing_since = 0.0
        self._last_emit_at: float | None = None
        self._output_interval = 1.0 / self.options.keepalive_fps  # smoothed, between processed frames
        self.loop_iterations = 0  # the supervisor's heartbeat reads it: a stuck loop stops counting
        self._started = False
        self._closed = False
        self.frames_emitted = 0
        self.ended_at: float | None = None
        """When the show ended: the ``duration`` deadline, the stop request or the last of
        ``max_frames`` (``time.monotonic()``); a recording holds its last frame until then."""
        self.on_applied: Callable[[dict[str, Any]], None] | None = None
        self.on_error: Callable[[str], None] | None = None
        if replicas is not None:
            replicas.on_wake = self._slot.wake
            self.stats.replicas_configured = len(replicas.lanes)
            self.stats.replicas = 0

    # ------------------------------------------------------------------ control
    def submit(
        self, changes: Mapping[str, Any], crossfade_s: float = 0.0, due: float | None = None
    ) -> dict[str, Any]:
        """Validate and queue live parameter changes for the next frame boundary.

        Prompt changes are encoded first on the prompt worker (the frame loop never waits
        on the text encoder); ``crossfade_s`` > 0 crossfades to a new prompt; ``due``
        (``time.monotonic()``) holds them until that time (a quantised scene load).

        Raises:
            ParamError: a value the registry refuses; nothing is queued then.
        """
        accepted = validate_changes(changes, LIVE_PARAMS)
        self.control.write(accepted, crossfade_s, due=due)
        self._slot.wake()
        return accepted

    def restore(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Apply saved live values (the supervisor's autosave) before the first frame.

        Prompts are encoded here, on the caller's thread, so the first frame already shows
        the restored look. A value the engine refuses now (say, LoRA scales for a config that
        lost a LoRA) is reported and left out; everything else is applied.

        Returns:
            The values applied.
        """
        changes = dict(values)
        while changes:
            try:
                self._apply(changes, 0.0)
            except ParamError as err:
                self._report_error(f"restore: {err}; the rest is restored")
                if err.name not in changes:
                    return {}
                del changes[err.name]
            except (RuntimeError, ValueError) as err:  # e.g. out of memory for a restored size
                self._report_error(f"restore failed, starting from the config: {err}")
                return {}
            else:
                return changes
        return {}

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        self._stop.set()
        self._slot.wake()
        if self.replicas is not None:
            self.replicas.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ lifecycle
    def status(self) -> dict[str, Any]:
        """The runtime statistics with the musical time (``/engine/*``, the operator page)."""
        music = self.music.status()
        return {
            **self.stats.snapshot(),
            "bpm": round(music.bpm, 3),
            "beat_position": music.beat,
            "beat_time": music.time,
            "beats_per_bar": music.beats_per_bar,
            "sequence_step": music.sequence_step,
        }

    def last_input_frame(self) -> Frame | None:
        """The newest input frame the frame loop took (``None`` before the first); any thread may
        ask (the operator page's thumbnail of the source playing)."""
        item = self._last_input
        return None if item is None else item.frame

    @property
    def last_change(self) -> ChangeStamp | None:
        """The latest committed change (its number and commit time; the outputs time its showing)."""
        return self._change

    def _lead_s(self) -> float:
        """The measured change-to-screen latency in seconds (before any change: the frame latency),
        read from the statistics at most every ``LEAD_REFRESH_S`` (their snapshot takes a lock the
        sink threads take too, and sorts the latency window)."""
        now = time.monotonic()
        if now >= self._lead_at:
            snapshot = self.stats.snapshot()
            milliseconds = snapshot.get("change_latency_ms") or snapshot.get("latency_ms") or 0.0
            self._lead = float(milliseconds) / 1000.0
            self._lead_at = now + LEAD_REFRESH_S
        return self._lead

    def start(self) -> None:
        """Start the source, post-processing and sink threads."""
        if self._started:
            return
        self._started = True
        self.music.start()
        self.stats.set_state(EngineState.WARMING)
        if self.replicas is not None:
            self.replicas.start(self.pipeline.state)
        for sink in self.sinks:
            sink.start()
        self.post.start()
        self.prompt_worker.start()
        self.source.start()
        self.control_feeds.start()
        if self.reference_feed is not None:
            self.reference_feed.start()

    def run(
        self,
        max_frames: int | None = None,
        duration: float | None = None,
        tick: Callable[[], None] | None = None,
    ) -> int:
        """Run the frame loop until ``stop()``, ``max_frames`` outputs or ``duration`` seconds.

        Returns the number of frames handed to the outputs.
        """
        self.start()
        deadline = None if duration is None else time.monotonic() + duration
        next_keepalive = time.monotonic()
        while not self._stop.is_set():
            self.loop_iterations += 1
            if max_frames is not None and self.frames_emitted >= max_frames:
                self.ended_at = time.monotonic()
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.ended_at = deadline  # the frame in progress at the deadline still goes out
                break
            if tick is not None:
                tick()
            self._apply_pending()
            self._poll_switch()
            if self.replicas is not None and not self._replicas_turn(time.monotonic()):
                now = time.monotonic()
                if self.replicas.active == 0 and now >= next_keepalive:  # none plays: outputs hold
                    self._emit(OutputItem(OutputKind.REPEAT, now, measure_latency=False))
                    next_keepalive = now + self._keepalive_interval()
                self.replicas.wait(self.replicas.wait_s(now))
                continue
            item = self._slot.take(timeout=min(1.0 / self.options.keepalive_fps, 0.1))
            now = time.monotonic()
            if item is None:
                self.music.frame(now, self._base)  # the sequence moves on while no frame comes
                health = self.source.health(now, self.options.stall_seconds)
                if health is not InputHealth.LIVE:
                    self._input_missing(health, now)
                    if now >= next_keepalive:
                        self._emit_on_loss(now)
                        next_keepalive = now + self._keepalive_interval()
                continue
            if self._input_health is not InputHealth.LIVE:
                self._input_back(now)
            next_keepalive = now + self._keepalive_interval()
            if self._crossfade is not None:  # a switched input fades in from the old one's last frame
                item = InputItem(self._crossfade.blend(item.tensor), item.frame)
                self._crossfade = None if self._crossfade.finished else self._crossfade
            self._process(item)
        for sink in self.sinks:
            sink.show_ended(self.ended_at if self.ended_at is not None else time.monotonic())
        self._drain(max_frames is not None or duration is not None)
        return self.frames_emitted

    def close(self) -> None:
        """Stop every thread and release every source, sink and segment; safe twice."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self.builds is not None:
            self.builds.close()
        self.post.queue.close()
        for sink in self.sinks:
            sink.queue.close()
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        self.control.wake()
        if self.reference_feed is not None:
            self.reference_feed.wake()
        references = () if self.reference_feed is None else self.reference_feed.threads
        sources = (self.source, *self.switch.threads())
        threads = (*sources, *self.control_feeds.threads(), *references, self.prompt_worker, self.post)
        for thread in (*threads, *self.sinks):
            if thread.is_alive():
                thread.join(max(0.05, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("thread %s did not stop in time", thread.name)
        if self.replicas is not None:
            self.replicas.close()
        if self.backend is not None:
            self.backend.close()
        self.music.close()
        self.stats.set_state(EngineState.STOPPED)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the frame loop
    def _process(self, item: InputItem) -> None:
        if tuple(item.tensor.shape[-2:]) != self._size:
            item = self._preprocess(item.frame)  # converted before a resolution change
        self._last_input = item
        self.stats.input_superseded = self._slot.overwritten
        frame = item.frame
        # 1. pause: freeze the output on the last frame (input keeps being consumed)
        if self.runtime_state["pause"]:
            self._feedback_ready = False  # the loop starts again from the input afterwards
            self.stats.set_state(EngineState.PAUSED)
            self._emit(OutputItem(OutputKind.REPEAT, frame.timestamp, measure_latency=False))
            return
        # 2. bypass: the input goes straight through
        if self.runtime_state["bypass"]:
            self._feedback_ready = False
            stamp = frame.timestamp
            self._emit(OutputItem(OutputKind.FRAME, stamp, frame=frame, source=frame, change=self._change))
            return
        # 3. a running prompt crossfade moves one step
        progress = self._step_transition() if self._transition is not None else None
        # 4. modulators: base + modulation for the moment this frame is seen (not echoed, not saved)
        self._modulate(self.music.frame(time.monotonic(), self._base))
        skipped_before = self.pipeline.stats.skipped
        image = None if self.pipeline.mode is GenerationMode.TXT2IMG else item.tensor
        controls = self.control_feeds.take()  # the ControlNets' own sources: newest frames
        reference = None if self.reference_feed is None else self.reference_feed.take()
        if reference is not None:  # the IP-Adapter source's newest frame, encoded off the loop
            self.pipeline.set_reference_tokens(reference)
        try:
            # 5. feedback: the previous output, transformed on the device, mixed into the input
            image = self._feed_back(image)
            if self.replicas is not None:  # 6'. a replica makes it; it leaves in input order
                self._send_to_replica(item, image, controls, reference, progress)
                return
            # 6. the pipeline (txt2img ignores the input; the source only paces the output)
            output = self.pipeline(image) if controls is None else self.pipeline(image, controls)
        # the frame guard: a failing frame (e.g. out of memory) must not black the screen;
        # the output holds, the error is reported, the next frame tries again
        except (RuntimeError, ValueError) as err:
            self._report_error(f"frame failed: {err}", frame_failed=True)
            self._emit(OutputItem(OutputKind.REPEAT, frame.timestamp, measure_latency=False))
            return
        if output is None:
            self.stats.set_state(EngineState.WARMING)
            return
        self._feedback_ready = True
        self.stats.set_state(EngineState.RUNNING)
        skipped = self.pipeline.stats.skipped != skipped_before
        self.stats.record_skip(skipped)
        change = None if skipped else self._change  # a skipped frame re-emits an older output
        self._emit(OutputItem(OutputKind.TENSOR, frame.timestamp, tensor=output, source=frame, change=change))

    def _feed_back(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """This frame's pipeline input with the feedback loop: ``image`` (``None`` in txt2img)
        itself while ``feedback_amount`` is 0 or there is no previous output of this size since the
        last start, pause, bypass or resolution change; else ``(1 - a) · image + a · T(previous)``,
        in txt2img ``T(previous)`` alone (``engine.stream.feedback``; all on the device)."""
        amount = self._feedback_amount
        previous = self.pipeline.last_output if self.replicas is None else self._replica_output
        if amount == 0.0 or not self._feedback_ready or previous is None:
            return image
        if tuple(previous.shape[-2:]) != self._size:
            return image  # made at another size: never fed back
        if image is None:
            return self.feedback.transform(previous, self._feedback_transform)
        return self.feedback.mix(image, previous, amount, self._feedback_transform)

    def _play(self, values: Mapping[str, Any]) -> None:
        """The per-frame runtime values (``FRAME_PARAMS``: the feedback) the loop plays from now on,
        bases or modulated; cannot fail (validated, or clamped by the modulation, before)."""
        if not values:
            return
        self._played.update(values)
        played = self._played
        self._feedback_amount = float(played["feedback_amount"])
        self._feedback_transform = FeedbackTransform(
            zoom=float(played["feedback_zoom"]),
            rotate=float(played["feedback_rotate"]),
            translate=(float(played["feedback_translate"][0]), float(played["feedback_translate"][1])),
            hue=float(played["feedback_hue"]),
            decay=float(played["feedback_decay"]),
        )

    def _input_missing(self, health: InputHealth, now: float) -> None:
        """The source is lost or stalled: say so once; ``on_loss`` applies until it is back."""
        if health is self._input_health:
            return
        if self._input_health is InputHealth.LIVE:
            self._missing_since = now
        self._input_health = health
        if health is InputHealth.STALLED:
            self.stats.set_state(EngineState.STALLED)
            logger.warning(
                "input stalled: no new frame for %.1f s (input.stall_seconds); outputs %s until "
                "frames return",
                self.options.stall_seconds,
                _ON_LOSS_WORDS[self.options.on_loss],
            )
        else:
            self.stats.set_state(EngineState.LOST)

    def _input_back(self, now: float) -> None:
        missing = now - self._missing_since
        logger.log(logging.INFO if missing >= 1.0 else logging.DEBUG, "input back after %.1f s", missing)
        self._input_health = InputHealth.LIVE
        self.stats.set_state(EngineState.RUNNING)

    def _keepalive_interval(self) -> float:
        """Seconds between ``on_loss`` frames: the rate the outputs ran at, so receivers (and a
        recording's timeline) see the stream go on as it was; at most ``keepalive_fps``."""
        return min(max(self._output_interval, 1.0 / self.options.keepalive_fps), 1.0)

    def _emit_on_loss(self, now: float) -> None:
        """Keep the outputs alive while the source is gone: hold, black or passthrough."""
        mode = self.options.on_loss
        if mode is OnLossMode.BLACK:
            frame = black_frame(self.pipeline.height, self.pipeline.width, now)
            self._emit(OutputItem(OutputKind.FRAME, now, frame=frame, measure_latency=False))
        elif mode is OnLossMode.PASSTHROUGH and self._last_input is not None:
            held = self._last_input.frame
            self._emit(
                OutputItem(OutputKind.FRAME, now, frame=type(held)(held.pixels, now), measure_latency=False)
            )
        else:
            self._emit(OutputItem(OutputKind.REPEAT, now, measure_latency=False))

    def _emit(self, item: OutputItem) -> None:
        """Hand ``item`` to the outputs; with replicas in its place in the input order."""
        if self.replicas is None:
            self._emit_now(item)
            return
        order = self.replicas.order
        order.arrive(order.expect(), item, time.monotonic())
        self._release()

    def _emit_now(self, item: OutputItem) -> None:
        if item.kind is OutputKind.REPEAT and self.post.last_frame is None and self.frames_emitted == 0:
            return  # nothing to repeat yet
        self.post.put(item)
        self.frames_emitted += 1
        if item.measure_latency:  # a frame that came from the source: the outputs' own rate
            now = time.monotonic()
            gap = None if self._last_emit_at is None else now - self._last_emit_at
            if gap is not None and gap < 1.0:  # a longer gap is a pause or a loss, not a rate
                self._output_interval += 0.2 * (gap - self._output_interval)
            self._last_emit_at = now

    def _apply_pending(self) -> None:
        if self.builds is not None:
            ready = self.builds.take_ready()
            if ready and not self._stop.is_set():
                self._apply_guarded(ready, 0.0)
            self.stats.building = self.builds.label
        # held changes (quantised, sequence steps) commit at the boundary nearest their time
        pending = self.control.take_pending(time.monotonic() + self._output_interval / 2)
        if pending is None:
            return
        self._apply_guarded(pending.changes, pending.crossfade_s)

    def _apply_guarded(self, changes: dict[str, Any], crossfade_s: float) -> None:
        """Apply a change; one that is refused or fails is reported and the engine plays on."""
        try:
            self._apply(changes, crossfade_s)
        except ParamError as err:
            self._report_error(str(err))
        # e.g. CUDA out of memory while making the buffers of a larger size: the pipeline
        # plans everything before it commits, so nothing changed
        except (RuntimeError, ValueError) as err:
            self._report_error(f"change of {', '.join(sorted(changes))} failed, nothing changed: {err}")

    def _apply(self, changes: dict[str, Any], crossfade_s: float) -> None:
        """One change at a frame boundary: runtime values, then the pipeline's (which may wait)."""
        runtime = validate_changes({k: v for k, v in changes.items() if k in RUNTIME_PARAMS}, RUNTIME_PARAMS)
        # source switches are applied (and echoed) once the new source sent its first frame
        switches = {key: runtime.pop(key) for key in SOURCE_KEYS if key in runtime}
        stream = {k: v for k, v in changes.items() if k not in RUNTIME_PARAMS}
        previous = self.pipeline.current_positive
        accepted = self._apply_to_pipeline(stream) if stream else {}
        size = (self.pipeline.height, self.pipeline.width)
        if size != self._size:  # the feedback starts again at the new size, its buffers too
            self._feedback_ready = False
            self.feedback.reset()
        self._size = size
        self.runtime_state.update(runtime)
        self._play({name: value for name, value in runtime.items() if name in FRAME_PARAMS})
        self.music.apply(runtime, time.monotonic())
        accepted.update(runtime)
        prompt_changed = any(k in accepted for k in ENCODED_PARAMS)
        if crossfade_s > 0 and prompt_changed:
            self._transition = (previous, time.monotonic(), crossfade_s)
            self.pipeline.set_prompt_transition(previous, 0.0)
        elif prompt_changed:
            self._transition = None
        if "pause" in runtime and not runtime["pause"]:
            self.stats.set_state(EngineState.RUNNING)
        self.control.mark_applied(accepted)
        if self.replicas is not None:  # the replicas commit it before the next frame they make
            self.replicas.sync(self.pipeline.state, transition=crossfade_s > 0 and prompt_changed)
        if accepted or "modulators" in runtime:  # the modulators start again from the new base
            applied = self.control.applied()
            self._base = {name: applied.get(name) for name in self.music.targets}
            self._restore_unmodulated(set(self._modulated) - self.music.targets)
            for name in accepted:  # its commit put the base in: modulate it again next frame
                self._modulated.pop(name, None)
        if accepted:  # the outputs time how long it takes to be seen (stats change_latency_ms)
            self._change = ChangeStamp((self._change.number if self._change else 0) + 1, time.monotonic())
        if accepted and self.on_applied is not None:
            self.on_applied(accepted)
        for key, name in switches.items():  # each refused on its own (they may come in one change)
            try:
                self._begin_switch(key, name)
            except ParamError as err:
                self._report_error(str(err))

    def _begin_switch(self, key: str, name: str) -> None:
        """``/input/select``, ``/controlnet/<i>/source``, ``/ip_adapter/source``: open ``name``
        beside the playing source (ParamError: it cannot be switched, or not to that)."""
        if self.source_names is None:
            raise ParamError(key, "this engine's sources are fixed; allowed: none")
        try:
            if not name:
                raise ValueError("'' (no source of its own) cannot be switched to; allowed: a source name")
            opener = self.source_names.opener(name)
            if key == "input_source":
                if name == self.runtime_state[key] and self.switch.waiting is None:
                    return  # already playing
                self.switch.start(name, opener)
            elif key == "ip_adapter_source":
                if self.reference_feed is None:
                    raise ValueError(
                        "the IP-Adapter has no source of its own; allowed: with model.ip_adapter.source"
                    )
                self.reference_feed.select(name, opener)
            else:
                self.control_feeds.select(int(key.rsplit("_", 1)[1]), name, opener)
        except ValueError as err:
            raise ParamError(key, str(err)) from None
        logger.info("%s: opening %s (%s plays until it sends a frame)", key, name, self.runtime_state[key])

    def _poll_switch(self) -> None:
        """Between two frames: swap switched-to sources in once they sent a frame, or refuse them."""
        outcomes: list[tuple[str, Ready | Failed]] = []
        outcome = self.switch.poll()
        if outcome is not None:
            outcomes.append(("input_source", outcome))
        outcomes += [(f"controlnet_source_{index}", done) for index, done in self.control_feeds.poll()]
        if self.reference_feed is not None:
            outcome = self.reference_feed.poll()
            if outcome is not None:
                outcomes.append(("ip_adapter_source", outcome))
        for key, done in outcomes:
            if isinstance(done, Failed):
                stays = self.runtime_state[key] or "the old one"
                self._report_error(f"{key}: {done.name} cannot be played ({done.reason}); {stays} stays")
            elif key == "input_source":
                self._swap_input(done.candidate)
            else:
                self._switched(key, done.candidate)

    def _swap_input(self, candidate: Candidate) -> None:
        """The main input becomes ``candidate`` (``swap_into``), fading in when asked."""
        self.source = swap_into(self._slot, self.source, candidate, self.switch)
        frames = int(self.runtime_state["input_crossfade"])
        last = self._last_input
        self._crossfade = Crossfade(last.tensor, frames) if frames > 0 and last is not None else None
        self._switched("input_source", candidate)

    def _switched(self, key: str, candidate: Candidate) -> None:
        """A switch is done: ``key`` holds the new name, applied and echoed."""
        self.runtime_state[key] = candidate.name
        accepted = {key: candidate.name}
        self.control.mark_applied(accepted)
        waited = (time.monotonic() - candidate.started_at) * 1000
        logger.info("%s switched to %s (opened, first frame in %.0f ms)", key, candidate.name, waited)
        if self.on_applied is not None:
            self.on_applied(accepted)

    def _apply_to_pipeline(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Commit ``changes`` now, or — when it needs runners not built yet — commit the rest now
        and let its shape part wait for a background build (the current shapes keep playing)."""
        builds = self.builds
        if builds is None:
            return apply_change(self.pipeline, changes)
        shape = {k: v for k, v in changes.items() if k in SHAPE_PARAMS}
        if shape:  # joins the change still waiting for its engines (the newer value wins)
            changes = {**changes, **builds.join(shape)}
        target = self.pipeline.target_for(changes)
        if target is None or ready_runners(self.pipeline, builds.backend, target) is not None:
            accepted = apply_change(self.pipeline, changes, builds.backend)
            if shape:
                builds.settle()  # a build for a shape nobody asks for any more stops
            return accepted
        rest = {k: v for k, v in changes.items() if k not in SHAPE_PARAMS}
        accepted = apply_change(self.pipeline, rest, builds.backend) if rest else {}  # refused: nothing waits
        builds.wait({k: v for k, v in changes.items() if k in SHAPE_PARAMS}, target)
        self.stats.building = builds.label
        return accepted

    def _modulate(self, values: dict[str, Any]) -> None:
        """Commit the modulated values that moved since the last frame (light: no echo, no autosave,
        no change stamp); parameters no longer modulated go back to their base."""
        self._restore_unmodulated(set(self._modulated) - set(values))
        moved = {name: value for name, value in values.items() if self._modulated.get(name) != value}
        if moved and self._commit_unechoed(moved, "modulation of"):
            self._modulated = dict(values)

    def _restore_unmodulated(self, names: set[str]) -> None:
        """Parameters a modulator left: back to the base the control state holds."""
        if not names:
            return
        applied = self.control.applied()
        base = {name: applied[name] for name in names if applied.get(name) is not None}
        for name in names:
            self._modulated.pop(name, None)
        if base:
            self._commit_unechoed(base, "restoring the base of")

    def _commit_unechoed(self, changes: dict[str, Any], doing: str) -> bool:
        """Commit ``changes`` without telling anyone (what the modulators play): the per-frame
        runtime values (the feedback) to the frame loop, the rest to the pipeline; a refusal is one
        rate-limited line and changes nothing of the pipeline. Whether all was committed."""
        self._play({name: value for name, value in changes.items() if name in FRAME_PARAMS})
        changes = {name: value for name, value in changes.items() if name not in FRAME_PARAMS}
        if not changes:
            return True
        try:
            apply_change(self.pipeline, changes, self.backend)
        except (ParamError, RuntimeError, ValueError) as err:
            self._log(logging.WARNING, "modulation", "%s %s refused: %s", doing, ", ".join(changes), err)
            return False
        if self.replicas is not None:
            self.replicas.sync(self.pipeline.state)
        return True

    def _step_transition(self) -> float:
        """The prompt crossfade's progress now (0..1, clamped by the pipeline), set on the pipeline."""
        assert self._transition is not None
        previous, start, duration = self._transition
        progress = (time.monotonic() - start) / duration
        self.pipeline.set_prompt_transition(previous, progress)
        if progress >= 1.0:
            self._transition = None
        return progress

    # ------------------------------------------------------------------ replicas
    def _replicas_turn(self, now: float) -> bool:
        """Between two frames with replicas: their health, restarts and joins (``ReplicaSet.poll``),
        what they made sent out in input order; whether one can take a frame now."""
        replicas = self.replicas
        assert replicas is not None
        for event in replicas.poll(now, self.pipeline.state):
            if event.fault:
                self._report_error(event.text)
            else:
                logger.info("%s", event.text)
        self.stats.replicas = replicas.active
        self.stats.replica_states = replicas.states()
        self._release()
        return replicas.free_lane(now) is not None

    def _send_to_replica(
        self,
        item: InputItem,
        image: torch.Tensor | None,
        controls: list[torch.Tensor | None] | None,
        reference: torch.Tensor | None,
        progress: float | None,
    ) -> None:
        """Frame ``item`` (its pipeline input ``image``, after the feedback) to the next replica in
        the rotation, with the newest frame of every ControlNet source and the newest IP-Adapter
        reference (each replica may not have seen the last ones: they go with every frame)."""
        replicas = self.replicas
        assert replicas is not None
        number = replicas.free_lane(time.monotonic())
        if number is None:  # it went between the loop's check and now
            self._emit(OutputItem(OutputKind.REPEAT, item.frame.timestamp, measure_latency=False))
            return
        if controls is not None:
            if len(self._controls) != len(controls):
                self._controls = [None] * len(controls)
            self._controls = [new if new is not None else old for new, old in zip(controls, self._controls)]
        if reference is not None:
            self._reference = reference
        if image is not None and image is not item.tensor:
            image = image.clone()  # the feedback's mix is a buffer the next frame writes over; sent later
        index = replicas.order.expect()
        meta = (item.frame, self._change, replicas.serial)
        sent_controls = None if controls is None else self._controls
        replicas.send_frame(number, index, image, meta, progress, self._reference, sent_controls)

    def _release(self) -> None:
        """Send out, in input order, what may leave the reorder buffer now."""
        assert self.replicas is not None
        for _, result in self.replicas.release(time.monotonic()):
            if isinstance(result, Made):
                self._emit_made(result)
            else:
                self._emit_now(result)

    def _emit_made(self, made: Made) -> None:
        """A replica's frame, as the engine's own loop would have sent it."""
        assert self.replicas is not None
        frame, change, serial = made.meta
        if made.error is not None:
            self._report_error(f"replica {made.replica}: {made.error}", frame_failed=True)
            self._emit_now(OutputItem(OutputKind.REPEAT, frame.timestamp, measure_latency=False))
            return
        if made.serial != serial:  # never shown: another picture than the engine's values make
            self.replicas.out_of_step(
                made.replica, f"it made frame with change {made.serial}, the engine had sent {serial}"
            )
            return
        if made.warming:
            if self.frames_emitted == 0:
                self.stats.set_state(EngineState.WARMING)
            return
        self.stats.set_state(EngineState.RUNNING)
        self.stats.record_skip(made.skipped)
        if made.skipped:  # the newest output again (a replica's own last one may be N frames older)
            if self._replica_output is not None:
                newest = self._replica_output
                self._emit_now(OutputItem(OutputKind.TENSOR, frame.timestamp, tensor=newest, source=frame))
            return
        self._replica_output = made.tensor
        self._feedback_ready = True
        item = OutputItem(OutputKind.TENSOR, frame.timestamp, tensor=made.tensor, source=frame, change=change)
        self._emit_now(item)

    def _report_error(self, message: str, frame_failed: bool = False) -> None:
        """Log (rate-limited), remember and announce an error.

        A refused parameter change is reported but leaves the state alone; only a failing
        frame puts the engine into ERROR (until the next good frame).
        """
        level = logging.ERROR if frame_failed else logging.WARNING
        self._log(level, message.split(":")[0], "%s", message)
        self.stats.last_error = message
        if frame_failed:
            self.stats.set_state(EngineState.ERROR, message)
        if self.on_error is not None:
            self.on_error(message)

    def _drain(self, wait: bool) -> None:
        """After a bounded run, let queued frames reach the outputs (at most ~2 s)."""
        if not wait:
            return
        self.post.drain(1.0)
        for sink in self.sinks:
            sink.drain(1.0)


def engine_from_config(
    config: Any,
    models: ModelBundle,
    settings: PipelineSettings | None = None,
    sink_extra: Mapping[str, Mapping[str, Any]] | None = None,
    backend: Backend | None = None,
    keep_recordings: bool = False,
    media_dir: str | os.PathLike[str] = "media",
) -> Engine:
    """An Engine for a validated config: pipeline, source and sinks from their sections.

    ``sink_extra`` adds options per bridge name (e.g. the preview's ``stats`` callable);
    ``backend`` runs the UNet and VAE (torch eager when ``None``); ``keep_recordings``
    (a resumed or restarted show) records into ``take-2.mp4`` ... when the file exists;
    ``media_dir``: where ``/input/select s file:NAME`` finds video files.
    """
    pipeline = open_pipeline(models, settings or PipelineSettings.from_config(config), backend)
    replicas = None
    if config.scale.replicas > 1:
        replica_settings = ReplicaSettings.from_config(config, str(models.device))
        replicas = ReplicaSet(replica_settings, config.model_dump(mode="json"), weights_fingerprint(models))
    source_name, source_options = source_spec(config.input)
    names = SourceNames(media_dir, config.input)
    stats = RuntimeStats()

    def opener(name: str, options: dict[str, Any]) -> Callable[[], FrameSink]:
        extra = dict((sink_extra or {}).get(name, {}))
        if name == "preview":
            extra.setdefault("stats", stats.snapshot)
            extra.setdefault("allow", list(config.osc.allow))  # the same allow-list as OSC
        if name == "record":
            from bridges.record import RecordingOpener  # the bridge module, imported when configured

            return RecordingOpener(options, extra, keep_existing=keep_recordings)
        return lambda: open_sink(name, **options, **extra)

    labels: list[tuple[str, Callable[[], FrameSink]]] = []
    for index, output in enumerate(config.outputs):
        name, options = sink_spec(output)
        labels.append((f"{name}{index}" if _count(config.outputs, name) > 1 else name, opener(name, options)))
    engine_options = EngineOptions(
        on_loss=OnLossMode(config.input.on_loss),
        retry_seconds=config.input.retry_seconds,
        stall_seconds=config.input.stall_seconds,
        sink_queue_sizes=[output.queue_size for output in config.outputs],
        output_scale=config.stream.output_scale,
        runtime_values={**runtime_values(config), **source_names_of(config, names)},
    )
    return Engine(
        pipeline,
        lambda: open_source(source_name, **source_options),
        labels,
        engine_options,
        stats,
        backend=backend,
        control_sources=control_sources(config),
        reference_source=reference_source(config),
        music_settings=MusicSettings.from_config(config),
        source_names=names,
        replicas=replicas,
    )


def runtime_values(config: Any) -> dict[str, Any]:
    """The starting values of the runtime's registry parameters that the config holds (tempo,
    quantize, modulators, sequence), as plain data."""
    values = config_values(config, RUNTIME_PARAMS)
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


def control_sources(config: Any) -> list[ControlSource]:
    """The ``model.controlnets`` entries with a bridge ``source`` of their own."""
    return [
        ControlSource(index, **_second_source(entry.source, f"model.controlnets[{index}].source"))
        for index, entry in enumerate(config.model.controlnets)
        if entry.source is not None
    ]


def reference_source(config: Any) -> ReferenceSource | None:
    """``model.ip_adapter.source``: the IP-Adapter reference frames from a bridge, or ``None``."""
    section = config.model.ip_adapter
    if section is None or section.source is None:
        return None
    return ReferenceSource(
        refresh_seconds=section.refresh_seconds, **_second_source(section.source, "model.ip_adapter.source")
    )


def source_names_of(config: Any, names: SourceNames) -> dict[str, str]:
    """The starting value of every source key: the configured sources' names."""
    values = {"input_source": names.name_of(config.input)}
    for index, entry in enumerate(config.model.controlnets):
        if entry.source is not None:
            values[f"controlnet_source_{index}"] = names.name_of(entry.source)
    adapter = config.model.ip_adapter
    if adapter is not None and adapter.source is not None:
        values["ip_adapter_source"] = names.name_of(adapter.source)
    return values


def _second_source(source: Any, key: str) -> dict[str, Any]:
    """The opener, label and loss handling of a second bridge configured at ``key``."""
    name, options = source_spec(source)
    return {
        "open_source": lambda: open_source(name, **options),
        "label": f"{name} ({key})",
        "on_loss": OnLossMode(source.on_loss),
        "retry_seconds": source.retry_seconds,
        "stall_seconds": source.stall_seconds,
    }


def _count(outputs: Any, name: str) -> int:
    return sum(1 for output in outputs if output.type == name)
