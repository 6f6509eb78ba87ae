"""``latentstage bench --replicas 1,2``: the engine's throughput and latency with N pipeline replicas."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.models.bundle import ModelBundle
from engine.pipeline import PipelineSettings

REPLICA_THREADS = 1
"""Torch threads of each replica and of the engine while measuring: N replicas on N cores stand in for
N GPUs (the engine's own work — source, hand-over, post-processing — shares the same cores)."""
_START_WAIT_S = 300.0


@dataclass(frozen=True)
class ReplicaRow:
    """One replica count: output frames per second and source-to-sink latency, per round."""

    replicas: int
    round_fps: tuple[float, ...]
    round_latency_ms: tuple[float, ...]
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
        from engine.bench import _CountingSink, _OnDemandSource
        from engine.runtime.changes import open_pipeline
        from engine.runtime.engine import Engine, EngineOptions
        from engine.runtime.replicas.coordinator import ReplicaSet, ReplicaSettings
        from engine.runtime.replicas.worker import weights_fingerprint

        self.count = count
        self.source = _OnDemandSource(settings.width, settings.height)
        self.sink = _CountingSink()
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
            engine.run(max_frames=engine.frames_emitted + 1, tick=self.source.wanted.set)
        say(f"replicas {self.count}: playing")
        engine.run(max_frames=engine.frames_emitted + max(frames, 1), tick=self.source.wanted.set)

    def run(self, frames: int) -> tuple[float, float]:
        """``frames`` more output frames; their rate (fps) and median source-to-sink latency (ms)."""
        engine = self.engine
        sent_before = self.sink.frames
        started = time.perf_counter()
        engine.run(max_frames=engine.frames_emitted + frames, tick=self.source.wanted.set)
        elapsed = time.perf_counter() - started
        latencies = engine.stats.latencies_ms()[-frames:]
        sent = self.sink.frames - sent_before
        fps = sent / elapsed if elapsed > 0 else 0.0
        return fps, statistics.median(latencies) if latencies else float("nan")

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
    """The engine (source thread, frame loop, post-processing, a sink) with each replica count of
    ``request``, in alternating rounds (1 2 1 2 ...), every process on ``REPLICA_THREADS`` torch thread;
    the similarity filter off (skips would measure the input, not the replicas)."""
    settings = replace(settings, similarity_filter_enabled=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(REPLICA_THREADS)
    variants: list[_ReplicaEngine] = []
    try:
        for count in request.counts:
            variants.append(_ReplicaEngine(models, settings, request.config, count))
            variants[-1].warm(warmup, say)
        results: list[list[tuple[float, float]]] = [[] for _ in variants]
        for _ in range(rounds):
            for index, variant in enumerate(variants):
                results[index].append(variant.run(frames))
        rows = []
        baseline = results[0]
        base_fps = statistics.median(fps for fps, _ in baseline)
        base_latency = statistics.median(ms for _, ms in baseline)
        for variant, result in zip(variants, results):
            replicas = variant.replicas
            rows.append(
                ReplicaRow(
                    variant.count,
                    tuple(fps for fps, _ in result),
                    tuple(ms for _, ms in result),
                    base_fps,
                    base_latency,
                    0 if replicas is None else replicas.order.late_dropped,
                    0 if replicas is None else sum("out of the rotation" in line for line in replicas.events),
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
        f"{REPLICA_THREADS} torch thread each; medians over rounds",
        f"  {'replicas':>8}{'fps':>9}{'latency ms':>12}{'throughput ÷ 1':>16}{'latency ÷ 1':>13}"
        f"{'late dropped':>14}{'taken out':>11}",
    ]
    for row in rows:
        lines.append(
            f"  {row.replicas:>8}{row.fps:>9.2f}{row.latency_ms:>12.1f}{row.throughput_ratio:>15.2f}x"
            f"{row.latency_ratio:>12.2f}x{row.late_dropped:>14}{row.out_of_rotation:>11}"
        )
    return "\n".join(lines)
