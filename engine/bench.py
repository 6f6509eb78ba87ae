"""`latentstage bench`: side-by-side throughput ratios measured in one run."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from engine.accel.backends import Backend
from engine.models.bundle import ModelBundle
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.progress import Progress, report
from engine.stream.modes import CfgType, GenerationMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRow:
    """One measured configuration: frames per second and milliseconds per frame."""

    group: str
    name: str
    fps: float
    baseline_fps: float

    @property
    def ms(self) -> float:
        return 1000.0 / self.fps if self.fps > 0 else float("inf")

    @property
    def ratio(self) -> float:
        return self.fps / self.baseline_fps if self.baseline_fps > 0 else float("nan")


def _frames(settings: PipelineSettings, count: int, moving: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand((1, 3, settings.height, settings.width), generator=g) * 2 - 1
    if not moving:
        return [base] * count
    return [torch.roll(base, shifts=4 * k, dims=3) for k in range(count)]


def _side_by_side(
    steps: Sequence[Callable[[torch.Tensor], object]],
    frames: Sequence[torch.Tensor],
    warmup: int,
    rounds: int = 3,
) -> list[float]:
    """Frames per second of each step, measured in alternating rounds (median of ``rounds``).

    Alternating A, B, A, B ... keeps slow drifts of the machine (clocks, other processes) from
    favouring whichever configuration happened to run first.
    """
    for step in steps:
        for frame in frames[:warmup]:
            step(frame)
    timed = frames[warmup:]
    results: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for index, step in enumerate(steps):
            _sync(frames[0].device)
            start = time.perf_counter()
            for frame in timed:
                step(frame)
            _sync(frames[0].device)
            elapsed = time.perf_counter() - start
            results[index].append(len(timed) / elapsed if elapsed > 0 else float("inf"))
    return [statistics.median(values) for values in results]


def _sync(device: torch.device) -> None:
    # benchmark only: a timing boundary must wait for queued GPU work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sequential_step(pipe: StreamPipeline) -> Callable[[torch.Tensor], object]:
    """The baseline: n UNet calls of batch 1 per frame, one after another (no stream batch)."""

    @torch.inference_mode()
    def step(frame: torch.Tensor) -> torch.Tensor:
        b = pipe.batch
        s = b.schedule
        x = b.noised_input(pipe.vae_runner.encode(frame.to(pipe.device, pipe.dtype)))
        x0 = x
        for i in range(b.n):
            eps = pipe.unet_runner(x, s.timesteps[i : i + 1], pipe._positive)
            x0 = s.c_out[i] * (x - s.beta[i] * eps) / s.alpha[i] + s.c_skip[i] * x
            if i < b.n - 1:
                x = s.alpha[i + 1] * x0 + s.beta[i + 1] * b.noise[i + 1 : i + 2]
        return pipe.vae_runner.decode(x0)

    return step


def run_bench(
    models: ModelBundle,
    settings: PipelineSettings,
    frames: int = 30,
    warmup: int = 5,
    steps: Sequence[int] = (1, 2, 4),
    progress: Progress | None = None,
    backends: Sequence[Backend] = (),
) -> list[BenchRow]:
    """Measure stream batch vs sequential, the cfg modes, the similarity filter and backends.

    ``backends`` (e.g. ONNX Runtime) are compared with torch eager on the configured settings.
    """
    settings = replace(settings, mode=GenerationMode.IMG2IMG, cross_frame_attention=False)
    moving = _frames(settings, frames + warmup, moving=True)
    static = _frames(settings, frames + warmup, moving=False)
    rows: list[BenchRow] = []

    def say(text: str) -> None:
        report(logger, progress, text)

    # 1. stream batch (one UNet call of batch n) vs n sequential calls of batch 1
    for n in steps:
        t_index_list = [round(i * 45 / max(n - 1, 1)) for i in range(n)] if n > 1 else [45]
        pipe = StreamPipeline(models, replace(settings, t_index_list=t_index_list, cfg_type=CfgType.NONE))
        say(f"stream batch vs sequential, n={n}")
        sequential, batched = _side_by_side([_sequential_step(pipe), pipe], moving, warmup)
        rows.append(BenchRow("denoising", f"sequential n={n}", sequential, sequential))
        rows.append(BenchRow("denoising", f"stream batch n={n}", batched, sequential))

    # 2. guidance modes at the configured t_index_list, gamma > 1
    modes = (CfgType.FULL, CfgType.ONETIME, CfgType.SELF, CfgType.NONE)
    pipes = [StreamPipeline(models, replace(settings, cfg_type=cfg, guidance_scale=1.4)) for cfg in modes]
    say("cfg full, onetime, self, none")
    rates = _side_by_side(pipes, moving, warmup)
    for cfg, pipe, fps in zip(modes, pipes, rates):
        rows.append(BenchRow("guidance", f"cfg {cfg.value} (batch {pipe.unet_batch_size})", fps, rates[0]))

    # 3. similarity filter on a static input
    filtered = [
        StreamPipeline(
            models, replace(settings, similarity_filter_enabled=on, similarity_filter_threshold=0.98)
        )
        for on in (False, True)
    ]
    say("similarity filter off / on, static input")
    off, on = _side_by_side(filtered, static, warmup)
    rows.append(BenchRow("similarity filter", "static input, filter off", off, off))
    rows.append(BenchRow("similarity filter", "static input, filter on", on, off))

    # 4. backends side by side on the configured settings
    if backends:
        say("backends: torch eager, " + ", ".join(b.describe() for b in backends))
        pipes = [StreamPipeline(models, settings)]
        pipes += [StreamPipeline(models, settings, backend=backend) for backend in backends]
        rates = _side_by_side(pipes, moving, warmup)
        names = ["torch eager", *(backend.describe()[:28] for backend in backends)]
        rows += [BenchRow("backend", name, fps, rates[0]) for name, fps in zip(names, rates)]
    return rows


def format_rows(rows: Sequence[BenchRow], header: str) -> str:
    """A table: group, configuration, fps, ms/frame, ratio to the group's baseline."""
    lines = [header, f"{'group':<18} {'configuration':<28} {'fps':>8} {'ms/frame':>9} {'ratio':>7}"]
    lines.append("-" * len(lines[1]))
    for row in rows:
        lines.append(f"{row.group:<18} {row.name:<28} {row.fps:>8.2f} {row.ms:>9.2f} {row.ratio:>6.2f}x")
    return "\n".join(lines)
