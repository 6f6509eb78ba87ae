"""``latentstage bench --replicas 1,2``: the engine's throughput and latency with N pipeline replicas."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from engine.models.bundle import ModelBundle
from engine.pipeline import PipelineSettings

REPLICA_THREADS = 1
"""Torch threads of each replica and of the engine while measuring: N replicas on N cores stand in for
N GPUs (the engine's own work — source, hand-over, post-processing — shares the same cores)."""
_START_WAIT_S = 300.0
SOURCE_FPS = 60.0
"""The bench's live input: faster than the engine with any replica count, so the newest frame is
always at most 1/60 s old when the frame loop takes it (a camera or a TouchDesigner feed); converting
its frames is the engine's work as with any source, and shares the cores with the replicas here."""


class _FlickerSink:
    """Counts what it is sent and how much consecutive frames differ: the mean absolute difference of
    their RGB levels (0..255) on every 4th pixel of every 4th row (cheap beside the replicas), over the
    frames of a window (``take``)."""

    def __init__(self) -> None:
        self.frames = 0
        self._previous: np.ndarray | None = None
        self._delta_sum = 0.0
        self._deltas = 0

    def send(self, frame: Any) -> None:
        self.frames += 1
        pixels = frame.pixels[::4, ::4, :3].astype(np.int16)
        if self._previous is not None and self._previous.shape == pixels.shape:
            self._delta_sum += float(np.abs(pixels - self._previous).mean())
            self._deltas += 1
        self._previous = pixels

    def take(self) -> float:
        """The mean difference since the last ``take`` (nan without two frames)."""
        mean = self._delta_sum / self._deltas if self._deltas else float("nan")
        self._delta_sum, self._deltas = 0.0, 0
        return mean

    def close(self) -> None:
        pass


class _LiveSource:
    """A still pattern picture, rendered once, due every ``1/fps`` seconds (no drift), like a live input
    that runs whatever the engine does (converting it is the source thread's only work). Still, so
    that consecutive outputs differ only where the pipelines making them disagree."""

    def __init__(self, width: int, height: int, fps: float = SOURCE_FPS, count: int = 1) -> None:
        from bridges.pattern import PatternSource

        pattern = PatternSource(30.0, width, height)
        self._pictures = [pattern.render(index) for index in range(count)]
        self._period = 1.0 / fps
        self._next = time.monotonic()
        self._sequence = 0

    def recv(self, timeout: float) -> Any:
        from bridges.base import Frame

        wait = self._next - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            return None
        time.sleep(max(0.0, wait))
        self._next = max(self._next + self._period, time.monotonic())
        self._sequence += 1
        return Frame(self._pictures[self._sequence % len(self._pictures)], time.monotonic(), self._sequence)

    def __str__(self) -> str:
        height, width = self._pictures[0].shape[:2]
        return f"bench pattern {width}x{height} @ {1 / self._period:g} fps"

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ReplicaRow:
    """One replica count: output frames per second and source-to-sink latency, per round."""

    replicas: int
    round_fps: tuple[float, ...]
    round_latency_ms: tuple[float, ...]
    round_flicker: tuple[float, ...]
    baseline_fps: float
    baseline_latency_ms: float
    late_dropped: int
    out_of_rotation: int

    @property
    def fps(self) -> float:
        return statistics.median(self.round_fps)

    @property
    def latency_ms(self) -> float:
        return statistics.median(self.round_latency_ms)

    @property
    def flicker(self) -> float:
        return statistics.median(self.round_flicker)

    @property
    def throughput_ratio(self) -> float:
        return self.fps / self.baseline_fps if self.baseline_fps > 0 else float("nan")

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms / self.baseline_latency_ms if self.baseline_latency_ms > 0 else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "fps": round(self.fps, 3),
            "latency_ms": round(self.latency_ms, 1),
            "throughput_ratio": round(self.throughput_ratio, 3),
            "latency_ratio": round(self.latency_ratio, 3),
            "round_fps": [round(fps, 3) for fps in self.round_fps],
            "round_latency_ms": [round(ms, 1) for ms in self.round_latency_ms],
            "flicker": round(self.flicker, 3),
            "late_dropped": self.late_dropped,
            "out_of_rotation": self.out_of_rotation,
        }


@dataclass(frozen=True)
class ReplicaRequest:
    """What the ``replicas`` group needs beyond the models: the config (replicas load from it) and the
    replica counts to set side by side (the first is the baseline)."""

    config: Any
    counts: tuple[int, ...] = (1, 2)


class _ReplicaEngine:
    """An ``Engine`` with ``count`` replicas (1: the engine's own loop) on an on-demand pattern source
    and a counting sink."""

    def __init__(self, models: ModelBundle, settings: PipelineSettings, config: Any, count: int) -> None:
        from engine.runtime.changes import open_pipeline
        from engine.runtime.engine import Engine, EngineOptions
        from engine.runtime.replicas.coordinator import ReplicaSet, ReplicaSettings
        from engine.runtime.replicas.worker import weights_fingerprint

        self.count = count
        self.source = _LiveSource(settings.width, settings.height)
        self.sink = _FlickerSink()
        replicas = None
        if count > 1:
            replica_settings = ReplicaSettings(
                count,
                [str(models.device)] * count,
                threads=REPLICA_THREADS,
                startup_s=_START_WAIT_S,
                max_restarts=config.supervise.max_restarts,
            )
            replicas = ReplicaSet(
                replica_settings, config.model_dump(mode="json"), weights_fingerprint(models)
            )
        self.replicas = replicas
        options = EngineOptions(stall_seconds=0.0)
        pipeline = open_pipeline(models, settings)
        sink = self.sink
        self.engine = Engine(
            pipeline, lambda: self.source, [("bench", lambda: sink)], options, replicas=replicas
        )

    def warm(self, frames: int, say: Callable[[str], None]) -> None:
        """Start, wait until every replica plays, then ``frames`` untimed frames."""
        engine = self.engine
        engine.start()
        deadline = time.monotonic() + _START_WAIT_S
        while self.replicas is not None and engine.stats.replicas < self.count:
            failed = [line for line in self.replicas.events if "stays out" in line]
            if time.monotonic() > deadline or failed:
                said = "; ".join(self.replicas.events) or f"not in {_START_WAIT_S:g} s"
                raise RuntimeError(f"{self.count} replicas did not start: {said}")
            engine.run(max_frames=engine.frames_emitted + 1)
        say(f"replicas {self.count}: playing")
        engine.run(max_frames=engine.frames_emitted + max(frames, 1))

    def run(self, frames: int) -> tuple[float, float, float]:
        """``frames`` more output frames; their rate (fps), median source-to-sink latency (ms) and mean
        difference between consecutive frames (0..255 levels)."""
        engine = self.engine
        sent_before = self.sink.frames
        self.sink.take()
        started = time.perf_counter()
        engine.run(max_frames=engine.frames_emitted + frames)
        elapsed = time.perf_counter() - started
        latencies = engine.stats.latencies_ms()[-frames:]
        sent = self.sink.frames - sent_before
        fps = sent / elapsed if elapsed > 0 else 0.0
        latency = statistics.median(latencies) if latencies else float("nan")
        return fps, latency, self.sink.take()

    def close(self) -> None:
        self.engine.close()


def measure_replicas(
    models: ModelBundle,
    settings: PipelineSettings,
    request: ReplicaRequest,
    frames: int,
    warmup: int,
    rounds: int,
    say: Callable[[str], None],
) -> list[ReplicaRow]:
    """The engine (a live source at ``SOURCE_FPS``, the frame loop, post-processing, a sink) with each
    replica count of ``request``, in alternating rounds (1 2 1 2 ...), every process on
    ``REPLICA_THREADS`` torch thread; the similarity filter off (skips would measure the input, not the
    replicas)."""
    from engine.bench import alternate_rounds  # bench imports this module

    settings = replace(settings, similarity_filter_enabled=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(REPLICA_THREADS)
    variants: list[_ReplicaEngine] = []
    try:
        for count in request.counts:
            variants.append(_ReplicaEngine(models, settings, request.config, count))
            variants[-1].warm(warmup, say)
        results = alternate_rounds(variants, lambda variant: variant.run(frames), rounds)
        rows = []
        baseline = results[0]
        base_fps = statistics.median(fps for fps, _, _ in baseline)
        base_latency = statistics.median(ms for _, ms, _ in baseline)
        for variant, result in zip(variants, results):
            replicas = variant.replicas
            rows.append(
                ReplicaRow(
                    variant.count,
                    tuple(fps for fps, _, _ in result),
                    tuple(ms for _, ms, _ in result),
                    tuple(delta for _, _, delta in result),
                    base_fps,
                    base_latency,
                    0 if replicas is None else replicas.order.late_dropped,
                    0 if replicas is None else replicas.taken_out,
                )
            )
        return rows
    finally:
        for variant in variants:
            variant.close()
        torch.set_num_threads(threads)


def format_replicas(rows: Sequence[ReplicaRow]) -> str:
    """Throughput and latency beside the first count's, one line per count."""
    lines = [
        f"replicas: the engine with N pipeline replicas (processes, torch.distributed gloo), "
        f"{REPLICA_THREADS} torch thread each, a still input at {SOURCE_FPS:g} fps; medians over rounds; "
        "flicker: mean |Δ| of consecutive outputs (0..255: the replicas disagreeing)",
        f"  {'replicas':>8}{'fps':>9}{'latency ms':>12}{'throughput ÷ 1':>16}{'latency ÷ 1':>13}"
        f"{'flicker':>9}{'late dropped':>14}{'taken out':>11}",
    ]
    for row in rows:
        lines.append(
            f"  {row.replicas:>8}{row.fps:>9.2f}{row.latency_ms:>12.1f}{row.throughput_ratio:>15.2f}x"
            f"{row.latency_ratio:>12.2f}x{row.flicker:>9.2f}{row.late_dropped:>14}{row.out_of_rotation:>11}"
        )
    return "\n".join(lines)
