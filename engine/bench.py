"""`latentstage bench`: side-by-side throughput ratios measured in one run."""

from __future__ import annotations

import importlib.util
import logging
import math
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, TypeVar

import torch

from bridges.base import Frame
from bridges.pattern import PatternSource
from engine import contenders
from engine.accel.backends import Backend
from engine.bench_replicas import ReplicaRequest, ReplicaRow, format_replicas, measure_replicas
from engine.claims import (
    ClaimsReport,
    finished_outputs,
    format_claims,
    mean_step,
    measure_claims,
    sequential_step,
)
from engine.contenders import Contender, Peer
from engine.models.bundle import ModelBundle
from engine.models.kinds import ControlPreprocessor
from engine.pipeline import ControlNetSettings, PipelineSettings, StreamPipeline
from engine.progress import Progress, report
from engine.runtime.changes import open_pipeline
from engine.stream.modes import CfgType, GenerationMode

logger = logging.getLogger(__name__)

ROUNDS = 3
"""Timed rounds per row; contenders alternate round by round and each row is their median."""


_V = TypeVar("_V")
_R = TypeVar("_R")


def alternate_rounds(variants: Sequence[_V], run: Callable[[_V], _R], rounds: int) -> list[list[_R]]:
    """``run`` of every variant in each of ``rounds`` rounds, the variants taking turns (A B A B ...),
    so a machine whose load drifts moves them alike; each variant's results in round order."""
    results: list[list[_R]] = [[] for _ in variants]
    for _ in range(rounds):
        for index, variant in enumerate(variants):
            results[index].append(run(variant))
    return results


class BenchGroup(str, Enum):
    """The groups of rows ``latentstage bench --groups`` can pick."""

    DENOISING = "denoising"
    GUIDANCE = "guidance"
    FILTER = "filter"
    BACKEND = "backend"
    CONTROLNET = "controlnet"
    FLICKER = "flicker"
    COMPARE = "compare"
    CLAIMS = "claims"
    MODULATION = "modulation"
    FEEDBACK = "feedback"
    REPLICAS = "replicas"


DEFAULT_GROUPS = (
    BenchGroup.DENOISING,
    BenchGroup.GUIDANCE,
    BenchGroup.FILTER,
    BenchGroup.BACKEND,
    BenchGroup.CONTROLNET,
    BenchGroup.FLICKER,
)


@dataclass(frozen=True)
class BenchRow:
    """One measured configuration.

    Attributes:
        group, name: where it is printed.
        fps: frames per second, the median of the rounds.
        baseline_fps: the group's baseline (its ratio is ``fps / baseline_fps``).
        round_ms: milliseconds per frame of each round (min–max in the table).
        key: a stable name for the JSON (``compare`` rows: latentstage, floor, diffusers ...).
    """

    group: str
    name: str
    fps: float
    baseline_fps: float
    round_ms: tuple[float, ...] = ()
    key: str = ""

    @property
    def ms(self) -> float:
        return 1000.0 / self.fps if self.fps > 0 else float("inf")

    @property
    def ratio(self) -> float:
        return self.fps / self.baseline_fps if self.baseline_fps > 0 else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "key": self.key or None,
            "ms": round(self.ms, 3),
            "fps": round(self.fps, 4),
            "ratio": round(self.ratio, 4),
            "min_ms": round(min(self.round_ms), 3) if self.round_ms else None,
            "max_ms": round(max(self.round_ms), 3) if self.round_ms else None,
            "round_ms": [round(ms, 3) for ms in self.round_ms],
        }


@dataclass(frozen=True)
class FlickerRow:
    """Flicker of one input with the feature cache off and on (same seeds, same frames).

    Attributes:
        input: which input (``slowly moving``, ``static``).
        off, on: mean absolute difference between consecutive outputs, in 0..255 levels.
        off_ms, on_ms: milliseconds per frame of each.
    """

    input: str
    off: float
    on: float
    off_ms: float
    on_ms: float

    @property
    def ratio(self) -> float:
        return self.on / self.off if self.off > 0 else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "mad_off": round(self.off, 4),
            "mad_on": round(self.on, 4),
            "ratio": None if math.isnan(self.ratio) else round(self.ratio, 4),
            "ms_off": round(self.off_ms, 2),
            "ms_on": round(self.on_ms, 2),
        }


class _LoopRatios:
    """What a row of the engine's own frame loop beside its baseline reports (``ModulationRow``,
    ``FeedbackRow``): medians of its rounds and of its step, the step's share, the ratios."""

    round_ms: tuple[float, ...]
    step_ms: tuple[float, ...]
    baseline_ms: float
    baseline_round_ms: tuple[float, ...]

    @property
    def frame_ms(self) -> float:
        return statistics.median(self.round_ms)

    @property
    def step(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def share(self) -> float:
        """The step's part of the frame time (0..1)."""
        return self.step / self.frame_ms if self.frame_ms > 0 else float("nan")

    @property
    def ratio(self) -> float:
        """Frame time ÷ the baseline's frame time (median ÷ median)."""
        return self.frame_ms / self.baseline_ms if self.baseline_ms > 0 else float("nan")

    @property
    def paired_ratio(self) -> float:
        """The median over rounds of this round's frame time ÷ the baseline's in the same round:
        a machine whose load changes between rounds moves both sides of each quotient alike."""
        pairs = [ms / base for ms, base in zip(self.round_ms, self.baseline_round_ms) if base > 0]
        return statistics.median(pairs) if pairs else float("nan")


@dataclass(frozen=True)
class ModulationRow(_LoopRatios):
    """The engine's frame loop with ``modulators`` active modulators (``MODULATORS``).

    Attributes:
        modulators: how many modulators run.
        round_ms: milliseconds per frame of each round (``Engine.run``, everything on the loop).
        step_ms: milliseconds per frame of each round spent in the modulation step alone:
            ``Music.frame`` (the modulators evaluated) + ``Engine._modulate`` (the moved values
            planned and committed through ``apply_change``).
        baseline_ms: the frame time with no modulators (the ratio's denominator).
        baseline_round_ms: the rounds without modulators, each run just before this row's round
            of the same index (``paired_ratio``).
        commits: pipeline commits during the timed rounds (each frame whose modulated values
            moved commits them once).
        frames: frames in the timed rounds.
    """

    modulators: int
    round_ms: tuple[float, ...]
    step_ms: tuple[float, ...]
    baseline_ms: float
    baseline_round_ms: tuple[float, ...] = ()
    commits: int = 0
    frames: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "modulators": self.modulators,
            "frame_ms": round(self.frame_ms, 3),
            "step_ms": round(self.step, 4),
            "step_share": round(self.share, 5),
            "time_ratio": round(self.ratio, 4),
            "paired_time_ratio": round(self.paired_ratio, 4),
            "commits": self.commits,
            "frames": self.frames,
            "round_ms": [round(ms, 3) for ms in self.round_ms],
            "round_step_ms": [round(ms, 4) for ms in self.step_ms],
        }


@dataclass(frozen=True)
class FeedbackRow(_LoopRatios):
    """The engine's frame loop with one setting of the feedback loop (``FEEDBACK``).

    Attributes:
        name: the setting, e.g. ``amount 0.5, zoom 1.02, rotate 1``.
        round_ms: milliseconds per frame of each round (``Engine.run``, everything on the loop).
        step_ms: milliseconds per frame of each round spent in ``Engine._feed_back`` (the transform
            and the mix; on a GPU only their launch, the kernels run with the frame's).
        baseline_ms: the frame time with the feedback off (amount 0; the ratio's denominator).
        baseline_round_ms: the rounds with it off, each run just before this row's round of the
            same index (``paired_ratio``).
        fed: frames of the timed rounds whose input the feedback changed.
        frames: frames in the timed rounds.
    """

    name: str
    round_ms: tuple[float, ...]
    step_ms: tuple[float, ...]
    baseline_ms: float
    baseline_round_ms: tuple[float, ...] = ()
    fed: int = 0
    frames: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "frame_ms": round(self.frame_ms, 3),
            "step_ms": round(self.step, 4),
            "step_share": round(self.share, 5),
            "time_ratio": round(self.ratio, 4),
            "paired_time_ratio": round(self.paired_ratio, 4),
            "fed": self.fed,
            "frames": self.frames,
            "round_ms": [round(ms, 3) for ms in self.round_ms],
            "round_step_ms": [round(ms, 4) for ms in self.step_ms],
        }


@dataclass
class Timing:
    """Frames per second of one contender: the median of its rounds, and each round's ms/frame."""

    fps: float
    round_ms: tuple[float, ...]


BASELINES = {
    "diffusers": "vs diffusers",
    "diffusers_taesd": "vs +TAESD",
    "streamdiffusion": "vs paper",
    "floor": "vs floor",
}
"""The compare rows every row is set against, by key, with their column names."""


@dataclass
class BenchReport:
    """Everything one bench run measured.

    Attributes:
        rows: the table rows, in order.
        summary: the headline figures (``overhead``, ``speedup_vs_diffusers`` ...), see ``compare``.
        latency: end-to-end latency of a short engine run (see ``measure_latency``).
        skipped: contenders that could not run, with the reason.
    """

    rows: list[BenchRow] = field(default_factory=list)
    flicker: list[FlickerRow] = field(default_factory=list)
    claims: ClaimsReport | None = None
    modulation: list[ModulationRow] = field(default_factory=list)
    feedback: list[FeedbackRow] = field(default_factory=list)
    replicas: list[ReplicaRow] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, dict[str, float]]:
        """Each compare row's fps ÷ each baseline's (``BASELINES``), by their keys."""
        compare = [row for row in self.rows if row.group == "compare"]
        baselines = [row for row in compare if row.key in BASELINES]
        return {row.key: {b.key: round(row.fps / b.fps, 4) for b in baselines} for row in compare}

    def as_json(self, header: str, facts: dict[str, Any]) -> dict[str, Any]:
        return {
            "header": header,
            **facts,
            "rows": [row.as_json() for row in self.rows],
            "flicker": [row.as_json() for row in self.flicker],
            "claims": None if self.claims is None else self.claims.as_json(),
            "modulation": [row.as_json() for row in self.modulation],
            "feedback": [row.as_json() for row in self.feedback],
            "replicas": [row.as_json() for row in self.replicas],
            "ratios": self.ratios(),
            "summary": {key: round(value, 4) for key, value in self.summary.items()},
            "latency": self.latency,
            "skipped": self.skipped,
        }


def machine_facts(models: ModelBundle) -> dict[str, Any]:
    """Where the figures come from: the processor or GPU, torch, the model and its dtype."""
    device = models.device
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": str(device),
        "hardware": where,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": models.source,
        "dtype": str(models.dtype).removeprefix("torch."),
    }


def frames_for(
    settings: PipelineSettings, models: ModelBundle, count: int, moving: bool
) -> list[torch.Tensor]:
    """``count`` input frames ``(1, 3, H, W)`` in [-1, 1] on the model's device and dtype.

    Moving frames scroll a fixed random picture by 4 pixels a frame; static ones repeat it.
    """
    g = torch.Generator().manual_seed(0)
    base = torch.rand((1, 3, settings.height, settings.width), generator=g) * 2 - 1
    base = base.to(models.device, models.dtype)
    if not moving:
        return [base] * count
    return [torch.roll(base, shifts=4 * k, dims=3) for k in range(count)]


def side_by_side(
    steps: Sequence[Callable[[torch.Tensor], object]],
    frames: Sequence[torch.Tensor],
    warmup: int,
    rounds: int = ROUNDS,
    per_step: Sequence[Sequence[torch.Tensor]] | None = None,
) -> list[Timing]:
    """Time each step in alternating rounds (A, B, A, B ...); each gets the median of its rounds.

    Alternating keeps slow drifts of the machine (clocks, other processes) from favouring
    whichever configuration happened to run first. Every step gets ``frames``, unless
    ``per_step`` gives each its own list (the same pictures in each step's own range).
    """
    per_step = per_step or [frames] * len(steps)
    for step, inputs in zip(steps, per_step, strict=True):
        for frame in inputs[:warmup]:
            step(frame)
    device = per_step[0][0].device

    def ms_per_frame(index: int) -> float:
        timed = per_step[index][warmup:]
        _sync(device)
        start = time.perf_counter()
        for frame in timed:
            steps[index](frame)
        _sync(device)
        return 1000.0 * (time.perf_counter() - start) / len(timed)

    results = alternate_rounds(range(len(steps)), ms_per_frame, rounds)
    medians = [statistics.median(values) for values in results]
    return [
        Timing(1000.0 / median if median > 0 else float("inf"), tuple(values))
        for median, values in zip(medians, results)
    ]


def time_contenders(
    entries: Sequence[Contender],
    frames: Sequence[torch.Tensor],
    warmup: int,
    rounds: int,
    group: str,
    baseline: str,
) -> list[BenchRow]:
    """Rows of ``entries`` timed side by side, each on ``frames`` in its own range (``unit_range``
    steps get them in [0, 1]); ratios are to the entry whose key is ``baseline``."""
    unit = [frame * 0.5 + 0.5 for frame in frames]
    inputs = [unit if entry.unit_range else frames for entry in entries]
    timings = side_by_side([entry.step for entry in entries], frames, warmup, rounds, per_step=inputs)
    reference = timings[[entry.key for entry in entries].index(baseline)]
    return [
        BenchRow(group, entry.label, timing.fps, reference.fps, timing.round_ms, entry.key)
        for entry, timing in zip(entries, timings)
    ]


def _sync(device: torch.device) -> None:
    # benchmark only: a timing boundary must wait for queued GPU work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _controlnet_pipeline(
    models: ModelBundle,
    settings: PipelineSettings,
    count: int,
    preprocessor: ControlPreprocessor = ControlPreprocessor.NONE,
) -> StreamPipeline:
    """A pipeline with ``count`` random ControlNets shaped for ``models`` (scale 1, on every slot)."""
    from engine.models.controlnet import build_random_controlnet, placed

    device, dtype = models.device, models.dtype
    nets = [placed(build_random_controlnet(models.unet, seed), device, dtype) for seed in range(count)]
    controls = tuple(ControlNetSettings(preprocessor=preprocessor) for _ in nets)
    return StreamPipeline(replace(models, controlnets=nets), replace(settings, controlnets=controls))


@dataclass
class CompareRequest:
    """What ``--compare`` asked for, and the other VAE diffusers' rows need.

    Attributes:
        peers: the tools to run beside latentstage.
        other_vae: a callable giving the VAE the engine is *not* configured with (the full VAE
            when it runs TAESD, TAESD when it runs the full VAE); called only when needed.
        latency_frames: frames of the short engine run that measures end-to-end latency.
    """

    peers: Sequence[Peer]
    other_vae: Callable[[], Any]
    latency_frames: int = 10


def run_bench(
    models: ModelBundle,
    settings: PipelineSettings,
    frames: int = 30,
    warmup: int = 5,
    steps: Sequence[int] = (1, 2, 4),
    progress: Progress | None = None,
    backends: Sequence[Backend] = (),
    groups: Sequence[BenchGroup] = DEFAULT_GROUPS,
    compare: CompareRequest | None = None,
    rounds: int = ROUNDS,
    replicas: ReplicaRequest | None = None,
) -> BenchReport:
    """Measure the chosen groups of rows.

    ``denoising``: stream batch vs sequential; ``guidance``: the cfg modes; ``filter``: the
    similarity filter on a static input; ``backend``: ``backends`` (e.g. ONNX Runtime) vs
    torch eager; ``controlnet``: 0, 1 and 2 ControlNets (and Canny); ``compare``: latentstage
    beside the floor and the peers of ``compare``; ``claims``: the paper's claims judged
    (``engine/claims.py``); ``modulation``: the engine's frame loop with 0 and 4 modulators
    (``measure_modulation``); ``feedback``: the engine's frame loop with the feedback loop off and
    on (``measure_feedback``); ``replicas``: the engine with each count of ``replicas`` (default 1, 2)
    of pipeline replicas side by side (``engine.bench_replicas``; it needs the config).
    """
    if BenchGroup.REPLICAS in groups and replicas is None:
        raise ValueError("the replicas group needs a ReplicaRequest (the config the replicas load)")
    pipeline_settings = settings  # the engine as configured (the replicas group runs it)
    settings = replace(settings, mode=GenerationMode.IMG2IMG, cross_frame_attention=False)
    moving = frames_for(settings, models, frames + warmup, moving=True)
    bench = BenchReport()
    rows = bench.rows

    def say(text: str) -> None:
        report(logger, progress, text)

    def add(group: str, name: str, timing: Timing, baseline: Timing, key: str = "") -> None:
        rows.append(BenchRow(group, name, timing.fps, baseline.fps, timing.round_ms, key))

    # 1. stream batch (one UNet call of batch n) vs n sequential calls of batch 1
    if BenchGroup.DENOISING in groups:
        for n in steps:
            t_index_list = [round(i * 45 / max(n - 1, 1)) for i in range(n)] if n > 1 else [45]
            pipe = StreamPipeline(models, replace(settings, t_index_list=t_index_list, cfg_type=CfgType.NONE))
            say(f"stream batch vs sequential, n={n}")
            sequential, batched = side_by_side([sequential_step(pipe), pipe], moving, warmup, rounds)
            add("denoising", f"sequential n={n}", sequential, sequential)
            add("denoising", f"stream batch n={n}", batched, sequential)

    # 2. guidance modes at the configured t_index_list, gamma > 1
    if BenchGroup.GUIDANCE in groups:
        modes = (CfgType.FULL, CfgType.ONETIME, CfgType.SELF, CfgType.NONE)
        pipes = [StreamPipeline(models, replace(settings, cfg_type=cfg, guidance_scale=1.4)) for cfg in modes]
        say("cfg full, onetime, self, none")
        rates = side_by_side(pipes, moving, warmup, rounds)
        for cfg, pipe, timing in zip(modes, pipes, rates):
            add("guidance", f"cfg {cfg.value} (batch {pipe.unet_batch_size})", timing, rates[0])

    # 3. similarity filter on a static input
    if BenchGroup.FILTER in groups:
        static = frames_for(settings, models, frames + warmup, moving=False)
        filtered = [
            StreamPipeline(
                models, replace(settings, similarity_filter_enabled=on, similarity_filter_threshold=0.98)
            )
            for on in (False, True)
        ]
        say("similarity filter off / on, static input")
        off, on = side_by_side(filtered, static, warmup, rounds)
        add("similarity filter", "static input, filter off", off, off)
        add("similarity filter", "static input, filter on", on, off)

    # 4. backends side by side on the configured settings
    if BenchGroup.BACKEND in groups and backends:
        say("backends: torch eager, " + ", ".join(b.describe() for b in backends))
        pipes = [StreamPipeline(models, settings)]
        pipes += [open_pipeline(models, settings, backend) for backend in backends]
        rates = side_by_side(pipes, moving, warmup, rounds)
        names = ["torch eager", *(backend.describe()[:40] for backend in backends)]
        for name, timing in zip(names, rates):
            add("backend", name, timing, rates[0])

    # 5. the cost of ControlNets: 0, 1 and 2 (random, shaped for the model), and of Canny
    if BenchGroup.CONTROLNET in groups:
        say("ControlNets: 0, 1, 2 (+ canny)")
        pipes = [_controlnet_pipeline(models, settings, count) for count in (0, 1, 2)]
        names = ["no ControlNet", "1 ControlNet", "2 ControlNets"]
        if importlib.util.find_spec("engine.conditioning.canny") is not None:
            pipes.append(_controlnet_pipeline(models, settings, 1, ControlPreprocessor.CANNY))
            names.append("1 ControlNet + canny")
        rates = side_by_side(pipes, moving, warmup, rounds)
        for name, timing in zip(names, rates):
            add("controlnet", name, timing, rates[0])

    # 6. flicker: consecutive outputs with the feature cache off and on
    if BenchGroup.FLICKER in groups:
        say("flicker: feature cache off / on, slowly moving and static input")
        bench.flicker = measure_flicker(models, settings, frames + warmup)

    # 7. latentstage beside the floor and the tools users would pick instead
    if BenchGroup.COMPARE in groups:
        request = compare or CompareRequest((), lambda: None)
        _compare(models, settings, moving, warmup, rounds, request, bench, say)

    # 8. the paper's claims, judged (meaningful on builtin:shapes, whose drawings the judge knows)
    if BenchGroup.CLAIMS in groups:
        from engine.judge.classifier import load_judge

        bench.claims = measure_claims(models, settings, load_judge(), frames, say)

    # 9. modulators on the engine's frame loop: none vs four (their evaluation, plan and commit)
    if BenchGroup.MODULATION in groups:
        say(f"modulation: the engine's frame loop with 0 and {len(MODULATORS)} modulators")
        bench.modulation = measure_modulation(models, settings, frames, warmup, rounds)
        for row in bench.modulation:
            fps, baseline = 1000.0 / row.frame_ms, 1000.0 / row.baseline_ms
            name = f"engine loop, {row.modulators} modulators"
            rows.append(BenchRow("modulation", name, fps, baseline, row.round_ms))

    # 10. the feedback loop on the engine's frame loop: off vs on (transform + mix on the device)
    if BenchGroup.FEEDBACK in groups:
        say("feedback: the engine's frame loop with the feedback off and on")
        bench.feedback = measure_feedback(models, settings, frames, warmup, rounds)
        for (key, _, _), feedback_row in zip(FEEDBACK, bench.feedback):
            fps, baseline = 1000.0 / feedback_row.frame_ms, 1000.0 / feedback_row.baseline_ms
            name = f"engine loop, feedback {key}"
            rows.append(BenchRow("feedback", name, fps, baseline, feedback_row.round_ms, key))

    # 11. replicas of the pipeline in processes of their own: throughput and latency beside one
    if replicas is not None and BenchGroup.REPLICAS in groups:
        counts = ", ".join(str(count) for count in replicas.counts)
        say(f"replicas: the engine with {counts} pipeline replicas")
        bench.replicas = measure_replicas(models, pipeline_settings, replicas, frames, warmup, rounds, say)
    return bench


def _compare(
    models: ModelBundle,
    settings: PipelineSettings,
    moving: list[torch.Tensor],
    warmup: int,
    rounds: int,
    request: CompareRequest,
    bench: BenchReport,
    say: Callable[[str], None],
) -> None:
    """The ``compare`` rows: every contender interleaved round by round, then their ratios."""
    pipe = StreamPipeline(models, settings)
    entries: list[Contender] = [contenders.latentstage(pipe), contenders.floor(pipe)]
    if Peer.DIFFUSERS in request.peers:
        say("preparing diffusers img2img (full VAE and TAESD)")
        other = request.other_vae()
        full_vae, taesd = (other, models.vae) if contenders.uses_taesd(models) else (models.vae, other)
        entries += contenders.diffusers_pair(models, full_vae, taesd, settings, pipe)
    if Peer.STREAMDIFFUSION in request.peers:
        reason = contenders.streamdiffusion_unavailable(models)
        if reason is not None:
            bench.skipped["streamdiffusion"] = reason
            say(f"skipped the paper's code: {reason}")
        else:
            say("preparing the paper's code (streamdiffusion)")
            entries.append(contenders.streamdiffusion(models, settings))
    say("compare: " + ", ".join(entry.label for entry in entries))
    keys = {entry.key for entry in entries}
    baseline = "diffusers" if "diffusers" in keys else "floor"
    rows = time_contenders(entries, moving, warmup, rounds, "compare", baseline)
    bench.rows += rows
    by_key = {row.key: row for row in rows}
    ours = by_key["latentstage"]
    bench.summary["overhead"] = by_key["floor"].fps / ours.fps  # frame time ÷ floor time
    for key, name in (
        ("diffusers", "speedup_vs_diffusers"),
        ("diffusers_taesd", "speedup_vs_diffusers_taesd"),
    ):
        if key in by_key:
            bench.summary[name] = ours.fps / by_key[key].fps
    if "streamdiffusion" in by_key:
        bench.summary["time_vs_streamdiffusion"] = by_key["streamdiffusion"].fps / ours.fps
    if request.latency_frames > 0:
        say(f"end-to-end latency: an engine run of {request.latency_frames} frames")
        bench.latency = measure_latency(models, settings, request.latency_frames)


def measure_flicker(models: ModelBundle, settings: PipelineSettings, frames: int) -> list[FlickerRow]:
    """Mean |Δ| between consecutive outputs (0..255) with the feature cache off and on.

    Two inputs: a picture drifting by one pixel a frame (slowly moving) and a static one, the
    similarity filter off; the same seed and frames for both settings. The cache's pipeline is
    made last and runs last: its processors stay on the shared UNet (``fallback`` keeps the
    cache-off pipeline exact) and come off when it is switched off at the end.
    """
    settings = replace(settings, similarity_filter_enabled=False)
    g = torch.Generator().manual_seed(1)
    base = (torch.rand((1, 3, settings.height, settings.width), generator=g) * 2 - 1).to(
        models.device, models.dtype
    )
    inputs = {
        "slowly moving": [torch.roll(base, shifts=k, dims=3) for k in range(frames)],
        "static (filter off)": [base] * frames,
    }
    rows = []
    for name, sequence in inputs.items():
        results = []
        for enabled in (False, True):
            pipe = StreamPipeline(models, replace(settings, feature_cache_enabled=enabled))
            started = time.perf_counter()
            outputs = finished_outputs(pipe, sequence)
            _sync(models.device)
            ms = 1000.0 * (time.perf_counter() - started) / len(sequence)
            results.append((mean_step(outputs), ms))
            if enabled:
                from engine.runtime.changes import apply_change

                apply_change(pipe, {"feature_cache_enabled": False})  # its processors come off the UNet
        (off, off_ms), (on, on_ms) = results
        rows.append(FlickerRow(name, off, on, off_ms, on_ms))
    return rows


class _CountingSink:
    """A sink that only counts: the latency run measures up to ``send``."""

    def __init__(self) -> None:
        self.frames = 0

    def send(self, frame: Frame) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


def measure_latency(models: ModelBundle, settings: PipelineSettings, frames: int) -> dict[str, float]:
    """End-to-end latency of a short engine run: pattern source timestamp → the sink's ``send``.

    The whole runtime runs (source thread, newest-frame slot, the pipeline, post-processing to
    uint8 RGBA, the sink thread) with a 30 fps pattern source at the bench's size.

    Returns:
        ``mean_ms``, ``median_ms``, ``max_ms`` over the frames that reached the sink, their
        number (``frames``) and the rate they arrived at (``fps``).
    """
    from bridges.base import open_source
    from engine.runtime.engine import Engine, EngineOptions

    pipe = StreamPipeline(models, settings)
    sink = _CountingSink()

    def source() -> Any:
        return open_source("pattern", fps=30.0, width=settings.width, height=settings.height)

    with Engine(pipe, source, [("bench", lambda: sink)], EngineOptions(stall_seconds=0.0)) as engine:
        started = time.monotonic()
        engine.run(max_frames=frames)
        elapsed = time.monotonic() - started
        latencies = engine.stats.latencies_ms()
    if not latencies:
        return {"frames": 0.0}
    return {
        "mean_ms": round(statistics.fmean(latencies), 1),
        "median_ms": round(statistics.median(latencies), 1),
        "max_ms": round(max(latencies), 1),
        "fps": round(sink.frames / elapsed, 3) if elapsed > 0 else 0.0,
        "frames": float(len(latencies)),
    }


MODULATORS: tuple[dict[str, Any], ...] = (
    {"target": "guidance_scale", "shape": "sine", "rate": "1beat", "depth": 0.3},
    {"target": "delta", "shape": "triangle", "rate": "2beats", "depth": 0.2},
    {"kind": "envelope", "target": "guidance_scale", "rate": "1beat", "depth": 0.5},
    {"target": "similarity_filter_threshold", "shape": "smooth_random", "rate": "1bar", "depth": 0.01},
)
"""The ``modulation`` group's modulators (at 120 BPM): LFOs on γ, δ and the filter threshold and a
beat-fired envelope on γ; every one moves its value on every frame, so every frame commits."""

MODULATION_BPM = 120.0


class _OnDemandSource:
    """Pattern pictures, one per frame-loop iteration: the loop's ``tick`` sets ``wanted`` and the
    source thread converts the next frame while the loop runs the current one, so a frame is
    always waiting and the source converts one frame per frame (a live input at least as fast as
    the engine, without a source thread spinning beside it)."""

    def __init__(self, width: int, height: int, count: int = 8) -> None:
        pattern = PatternSource(30.0, width, height)
        self._pictures = [pattern.render(index) for index in range(count)]
        self.wanted = threading.Event()
        self.wanted.set()
        self._sequence = 0

    def recv(self, timeout: float) -> Frame | None:
        if not self.wanted.wait(timeout):
            return None
        self.wanted.clear()
        self._sequence += 1
        return Frame(self._pictures[self._sequence % len(self._pictures)], time.monotonic(), self._sequence)

    def __str__(self) -> str:
        height, width = self._pictures[0].shape[:2]
        return f"bench pattern {width}x{height}, one frame per loop iteration"

    def close(self) -> None:
        pass


class _TimedEngine:
    """An ``Engine`` on an on-demand pattern source and a counting sink, one step of it timed.

    ``step="modulation"``: the engine's own two calls, wrapped on this instance: ``music.frame``
    (the modulators evaluated for the frame) and ``_modulate`` (the moved values through
    ``apply_change``: plan, commit). ``step="feedback"``: ``_feed_back`` (the previous output
    transformed and mixed into the input; ``fed`` counts the frames it changed).
    """

    def __init__(
        self,
        models: ModelBundle,
        settings: PipelineSettings,
        runtime_values: dict[str, Any],
        step: str = "modulation",
    ):
        from engine.runtime.engine import Engine, EngineOptions

        self.source = _OnDemandSource(settings.width, settings.height)
        sink = _CountingSink()
        options = EngineOptions(stall_seconds=0.0, runtime_values={"bpm": MODULATION_BPM, **runtime_values})
        pipe = StreamPipeline(models, settings)
        self.engine = engine = Engine(pipe, lambda: self.source, [("bench", lambda: sink)], options)
        self.device = models.device
        self.step_s = 0.0
        self.commits = 0  # pipeline commits while timed (``run`` after the warm-up)
        self.fed = 0  # frames whose input the feedback changed
        if step == "feedback":
            self._time_feedback()
            return
        music_frame, modulate = engine.music.frame, engine._modulate

        def timed_frame(now: float, base: Any) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                return music_frame(now, base)
            finally:
                self.step_s += time.perf_counter() - started

        def timed_modulate(values: dict[str, Any]) -> None:
            started = time.perf_counter()
            try:
                modulate(values)
            finally:
                self.step_s += time.perf_counter() - started

        engine.music.frame = timed_frame  # type: ignore[method-assign]
        engine._modulate = timed_modulate  # type: ignore[method-assign]

    def _time_feedback(self) -> None:
        feed_back = self.engine._feed_back

        def timed_feed_back(image: torch.Tensor | None) -> torch.Tensor | None:
            started = time.perf_counter()
            try:
                result = feed_back(image)
            finally:
                self.step_s += time.perf_counter() - started
            self.fed += result is not image
            return result

        self.engine._feed_back = timed_feed_back  # type: ignore[method-assign]

    def run(self, frames: int) -> tuple[float, float]:
        """``frames`` more output frames through ``Engine.run``; ms per frame of the whole loop
        and of the timed step."""
        engine = self.engine
        step_before, version_before = self.step_s, engine.pipeline.version
        _sync(self.device)
        started = time.perf_counter()
        engine.run(max_frames=engine.frames_emitted + frames, tick=self.source.wanted.set)
        _sync(self.device)
        elapsed = time.perf_counter() - started
        self.commits += engine.pipeline.version - version_before
        return 1000.0 * elapsed / frames, 1000.0 * (self.step_s - step_before) / frames

    def close(self) -> None:
        self.engine.close()


def measure_modulation(
    models: ModelBundle, settings: PipelineSettings, frames: int, warmup: int, rounds: int = ROUNDS
) -> list[ModulationRow]:
    """The engine's frame loop (``Engine.run``: source slot, modulation, pipeline, hand-off to the
    post thread) with no modulators and with ``MODULATORS``, in alternating rounds (A B A B ...).

    Each variant is its own ``Engine`` and pipeline on the same models; the similarity filter is
    off (a modulated threshold would change which frames are skipped, not what modulation costs).
    At least one warm-up frame each, untimed, starts the threads and fills the stream batch.
    """
    settings = replace(settings, similarity_filter_enabled=False)
    modulated = {"modulators": [dict(item) for item in MODULATORS]}
    variants = [_TimedEngine(models, settings, {}), _TimedEngine(models, settings, modulated)]
    try:
        for variant in variants:
            variant.run(max(warmup, 1))
            variant.commits = 0
        timings = alternate_rounds(variants, lambda variant: variant.run(frames), rounds)
    finally:
        for variant in variants:
            variant.close()
    baseline = statistics.median(ms for ms, _ in timings[0])
    return [
        ModulationRow(
            count,
            tuple(ms for ms, _ in results),
            tuple(step for _, step in results),
            baseline,
            tuple(ms for ms, _ in timings[0]),
            variant.commits,
            frames * rounds,
        )
        for count, results, variant in zip((0, len(MODULATORS)), timings, variants)
    ]


def format_modulation(rows: Sequence[ModulationRow]) -> str:
    """The modulation step's cost beside the frame time, per number of modulators."""
    lines = [
        "modulation: the engine's frame loop; step = Music.frame + Engine._modulate (plan + commit "
        "of the moved values); paired ÷ = median over rounds of the round's time ÷ 0 mods' in it",
        f"  {'modulators':>10}{'ms/frame':>12}{'step ms/frame':>16}{'step share':>12}{'time ÷ 0 mods':>15}"
        f"{'paired ÷':>10}{'commits/frame':>15}",
    ]
    for row in rows:
        commits = row.commits / row.frames if row.frames else float("nan")
        lines.append(
            f"  {row.modulators:>10}{row.frame_ms:>12.2f}{row.step:>16.3f}{100 * row.share:>11.4f}%"
            f"{row.ratio:>14.3f}x{row.paired_ratio:>9.3f}x{commits:>15.2f}"
        )
    return "\n".join(lines)


FEEDBACK: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("off", "off (amount 0)", {"feedback_amount": 0.0}),
    (
        "on",
        "amount 0.5, zoom 1.02, rotate 1",
        {"feedback_amount": 0.5, "feedback_zoom": 1.02, "feedback_rotate": 1.0},
    ),
)
"""The ``feedback`` group's settings (key, name, values): off, and on with a slowly turning tunnel
(one grid_sample and the mix per frame; the grid is made once, the parameters stay)."""


def measure_feedback(
    models: ModelBundle, settings: PipelineSettings, frames: int, warmup: int, rounds: int = ROUNDS
) -> list[FeedbackRow]:
    """The engine's frame loop (``Engine.run``) with the feedback loop off and on (``FEEDBACK``),
    in alternating rounds (A B A B ...), img2img, the similarity filter off.

    Each variant is its own ``Engine`` and pipeline on the same models; at least two warm-up frames
    each (untimed) start the threads, fill the stream batch and give the loop a previous output.
    """
    settings = replace(settings, similarity_filter_enabled=False)
    variants = [_TimedEngine(models, settings, values, step="feedback") for _, _, values in FEEDBACK]
    try:
        for variant in variants:
            variant.run(max(warmup, 2))
            variant.fed = 0
        timings = alternate_rounds(variants, lambda variant: variant.run(frames), rounds)
    finally:
        for variant in variants:
            variant.close()
    baseline = statistics.median(ms for ms, _ in timings[0])
    return [
        FeedbackRow(
            name,
            tuple(ms for ms, _ in results),
            tuple(step for _, step in results),
            baseline,
            tuple(ms for ms, _ in timings[0]),
            variant.fed,
            frames * rounds,
        )
        for (_, name, _), results, variant in zip(FEEDBACK, timings, variants)
    ]


def format_feedback(rows: Sequence[FeedbackRow]) -> str:
    """The feedback step's cost beside the frame time, off and on."""
    lines = [
        "feedback: the engine's frame loop; step = Engine._feed_back (transform + mix; on a GPU only "
        "their launch); paired ÷ = median over rounds of the round's time ÷ off's in it",
        f"  {'setting':<34}{'ms/frame':>10}{'step ms/frame':>15}{'step share':>12}{'time ÷ off':>12}"
        f"{'paired ÷':>10}{'fed/frame':>11}",
    ]
    for row in rows:
        fed = row.fed / row.frames if row.frames else float("nan")
        lines.append(
            f"  {row.name:<34}{row.frame_ms:>10.2f}{row.step:>15.3f}{100 * row.share:>11.3f}%"
            f"{row.ratio:>11.3f}x{row.paired_ratio:>9.3f}x{fed:>11.2f}"
        )
    return "\n".join(lines)


def format_rows(rows: Sequence[BenchRow], header: str) -> str:
    """A table: group, configuration, fps, ms/frame, min–max of the rounds, ratio to the group's baseline."""
    title = f"{'group':<18} {'configuration':<40} {'fps':>8} {'ms/frame':>10} {'min-max ms':>19} {'ratio':>7}"
    lines = [header, title, "-" * len(title)]
    for row in rows:
        spread = f"{min(row.round_ms):.1f}-{max(row.round_ms):.1f}" if row.round_ms else ""
        lines.append(
            f"{row.group:<18} {row.name:<40} {row.fps:>8.2f} {row.ms:>10.1f} {spread:>19} {row.ratio:>6.2f}x"
        )
    return "\n".join(lines)


SUMMARY_LINES = {
    "overhead": ("overhead: latentstage frame time ÷ floor", "x (target <= 1.02)"),
    "speedup_vs_diffusers": (
        "latentstage speed-up over diffusers img2img defaults",
        "x (target >= 3.5 at 512²)",
    ),
    "speedup_vs_diffusers_taesd": ("latentstage speed-up over diffusers img2img + TAESD", "x"),
    "time_vs_streamdiffusion": ("latentstage frame time ÷ the paper's code's", "x (target <= 1.0)"),
}


def format_report(bench: BenchReport, header: str) -> str:
    """The table, then the compare figures, the latency and what was skipped (one line each)."""
    lines = [format_rows(bench.rows, header) if bench.rows else header]
    compare = [row for row in bench.rows if row.group == "compare"]
    baselines = [row for row in compare if row.key in BASELINES]
    if baselines:
        lines.append("")
        lines.append("compare: each row's speed relative to each baseline (row fps ÷ baseline fps)")
        lines.append(f"  {'configuration':<40}" + "".join(f"{BASELINES[b.key]:>14}" for b in baselines))
        for row in compare:
            ratios = "".join(f"{row.fps / b.fps:>13.2f}x" for b in baselines)
            lines.append(f"  {row.name:<40}{ratios}")
    for key, value in bench.summary.items():
        label, unit = SUMMARY_LINES[key]
        lines.append(f"{label}: {value:.3f}{unit}")
    if bench.latency.get("frames"):
        lat = bench.latency
        lines.append(
            f"end-to-end latency (pattern source → sink, {int(lat['frames'])} frames): mean "
            f"{lat['mean_ms']:.1f} ms, median {lat['median_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
            f"({lat['fps']:.2f} fps)"
        )
    if bench.flicker:
        lines.append("")
        lines.append("flicker: mean |Δ| between consecutive outputs (0..255 levels), feature cache off vs on")
        lines.append(f"  {'input':<24}{'off':>10}{'on':>10}{'on÷off':>9}{'ms off':>10}{'ms on':>10}")
        for flicker in bench.flicker:
            lines.append(
                f"  {flicker.input:<24}{flicker.off:>10.3f}{flicker.on:>10.3f}"
                + ("        -" if math.isnan(flicker.ratio) else f"{flicker.ratio:>8.2f}x")
                + f"{flicker.off_ms:>10.1f}{flicker.on_ms:>10.1f}"
            )
    if bench.claims is not None:
        lines.append("")
        lines.append(format_claims(bench.claims))
    if bench.modulation:
        lines.append("")
        lines.append(format_modulation(bench.modulation))
    if bench.feedback:
        lines.append("")
        lines.append(format_feedback(bench.feedback))
    if bench.replicas:
        lines.append("")
        lines.append(format_replicas(bench.replicas))
    for name, reason in bench.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)
