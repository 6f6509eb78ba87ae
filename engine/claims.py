"""The paper's claims as measurements: prompt alignment by the judge, stream batch, flicker, the filter."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bridges.pattern import PatternSource
from engine.accel.base import Conditioning
from engine.extensions.sdxl import sdxl_inputs
from engine.imageops import frame_to_tensor
from engine.judge.classifier import Judge
from engine.models.bundle import ModelBundle
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.stream.modes import CfgType, GenerationMode

logger = logging.getLogger(__name__)

PROMPTS = ("red", "blue stripes", "a yellow circle on a purple background")
"""The prompts every alignment row is scored on (a colour, a texture, a shape on a ground)."""
GUIDANCE = 1.4
"""γ of every guided row: the paper's Fig. 7 value (δ 1.0), the same for all modes."""
DELTA = 1.0
"""δ of the self/onetime rows."""
TXT2IMG_T_INDEX = [0, 16, 32, 45]
"""txt2img rows start from noise at the top of the schedule (t 999, 679, 359, 99)."""
FILTER_THRESHOLD = 0.98
STATIC_FRAMES = 30  # the similarity filter's input: this many static frames, then moving ones
MOVING_FRAMES = 30
CHANGE_LEVEL = 0.5  # 0..255 levels: an output differing by more than this from the last has moved
FOLLOWS = 0.6  # a judge score at or above this follows the prompt


@dataclass(frozen=True)
class AlignmentRow:
    """How well the outputs follow the prompt: the judge's mean score, and per prompt."""

    name: str
    score: float
    by_prompt: tuple[float, ...]


@dataclass(frozen=True)
class FlickerClaim:
    """Mean |Δ| between consecutive outputs (0..255) and the judge's score, on one input."""

    input: str
    setting: str
    mad: float
    score: float


@dataclass
class ClaimsReport:
    """Everything ``measure_claims`` measured (same seed, prompts and inputs for every row).

    Attributes:
        alignment: the judge's score per guidance mode, img2img (test pattern) and txt2img.
        batch: stream batch vs sequential: both scores and the PSNR between their outputs.
        flicker: feature cache and cross-frame attention off/on, drifting and static input.
        filter: UNet calls with the filter off/on on static-then-moving input, and the frames
            of lag when motion resumes.
        prompt_change: frames (and seconds here) from a prompt change to an output the judge
            says follows it.
    """

    alignment: list[AlignmentRow] = field(default_factory=list)
    batch: dict[str, float] = field(default_factory=dict)
    flicker: list[FlickerClaim] = field(default_factory=list)
    filter: dict[str, float] = field(default_factory=dict)
    prompt_change: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "prompts": list(PROMPTS),
            "guidance_scale": GUIDANCE,
            "delta": DELTA,
            "alignment": [
                {
                    "name": row.name,
                    "score": round(row.score, 4),
                    "by_prompt": [round(s, 4) for s in row.by_prompt],
                }
                for row in self.alignment
            ],
            "batch": {key: round(value, 4) for key, value in self.batch.items()},
            "flicker": [
                {
                    "input": row.input,
                    "setting": row.setting,
                    "mad": round(row.mad, 4),
                    "score": round(row.score, 4),
                }
                for row in self.flicker
            ],
            "filter": {key: round(value, 4) for key, value in self.filter.items()},
            "prompt_change": {key: round(value, 4) for key, value in self.prompt_change.items()},
        }


def pattern_frames(
    settings: PipelineSettings, models: ModelBundle, count: int, start: int = 0, step: int = 1
) -> list[torch.Tensor]:
    """The engine's own test pattern: ``count`` frames ``(1, 3, H, W)`` in [-1, 1], frame indices
    ``start, start + step, ...`` (``step`` 0: a still picture)."""
    with PatternSource(fps=30.0, width=settings.width, height=settings.height) as source:
        pictures = [torch.from_numpy(source.render(start + k * step)) for k in range(count)]
    return [
        frame_to_tensor(rgba, settings.height, settings.width).to(models.device, models.dtype)
        for rgba in pictures
    ]


def finished_outputs(
    step: Callable[[Any], torch.Tensor | None], frames: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """The finished outputs ``(1, 3, H, W)`` in [0, 1] on the CPU (float32), in order."""
    outputs = []
    for frame in frames:
        out = step(frame)
        if out is not None:
            outputs.append(((out.float().clamp(-1, 1) + 1) / 2).cpu())
    return outputs


def _score(judge: Judge, outputs: Sequence[torch.Tensor], prompt: str) -> float:
    return float(judge.score(torch.cat(list(outputs)), prompt).mean())


def mean_step(outputs: Sequence[torch.Tensor]) -> float:
    """Mean |Δ| between consecutive pictures in [0, 1], in 0..255 levels (0 for fewer than two)."""
    steps = [float((b - a).abs().mean()) * 255.0 for a, b in itertools.pairwise(outputs)]
    return statistics.fmean(steps) if steps else 0.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two pictures in [0, 1] (``inf`` when equal)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@contextmanager
def _attention_restored(models: ModelBundle) -> Iterator[None]:
    """Put the UNet's attention processors back as they were (cross-frame attention installs its own)."""
    saved = dict(models.unet.attn_processors)
    try:
        yield
    finally:
        models.unet.set_attn_processor(saved)


def _alignment_row(
    name: str,
    models: ModelBundle,
    settings: PipelineSettings,
    frames: Sequence[torch.Tensor | None],
    judge: Judge,
) -> AlignmentRow:
    scores = []
    for prompt in PROMPTS:
        pipe = StreamPipeline(models, replace(settings, prompt=prompt))
        scores.append(_score(judge, finished_outputs(pipe, frames), prompt))
    return AlignmentRow(name, statistics.fmean(scores), tuple(scores))


def sequential_step(pipe: StreamPipeline) -> Callable[[torch.Tensor], torch.Tensor]:
    """The baseline: n UNet calls of batch 1 per frame, one after another (no stream batch)."""
    added = sdxl_inputs(pipe)  # SDXL: each call's row of text_embeds and time_ids
    rows = [
        None if added is None else Conditioning({name: t[i : i + 1] for name, t in added.inputs.items()})
        for i in range(pipe.batch.n)
    ]

    @torch.inference_mode()
    def step(frame: torch.Tensor) -> torch.Tensor:
        b = pipe.batch
        s = b.schedule
        x = b.noised_input(pipe.runners.vae.encode(frame.to(pipe.device, pipe.dtype)))
        x0 = x
        _, _, embeddings = pipe.unet_inputs()
        for i in range(b.n):
            eps = pipe.runners.unet(x, s.timesteps[i : i + 1], embeddings[i : i + 1], rows[i])
            x0 = s.c_out[i] * (x - s.beta[i] * eps) / s.alpha[i] + s.c_skip[i] * x
            if i < b.n - 1:
                x = s.alpha[i + 1] * x0 + s.beta[i + 1] * b.noise[i + 1 : i + 2]
        return pipe.runners.vae.decode(x0)

    return step


def measure_alignment(
    models: ModelBundle, settings: PipelineSettings, judge: Judge, frames: int
) -> list[AlignmentRow]:
    """The judge's score of the input itself, then of each guidance mode: img2img on the test
    pattern with ``settings``' slots, and txt2img from noise on ``TXT2IMG_T_INDEX``."""
    inputs = pattern_frames(settings, models, frames)
    pictures = [(frame.float().cpu() + 1) / 2 for frame in inputs]
    as_is = tuple(_score(judge, pictures, prompt) for prompt in PROMPTS)
    rows = [AlignmentRow("img2img input (no diffusion)", statistics.fmean(as_is), as_is)]
    txt2img = replace(settings, mode=GenerationMode.TXT2IMG, t_index_list=TXT2IMG_T_INDEX)
    for base, sequence in ((settings, list(inputs)), (txt2img, [None] * frames)):
        mode = base.mode
        for cfg in (CfgType.NONE, CfgType.FULL, CfgType.SELF, CfgType.ONETIME):
            guided = replace(base, cfg_type=cfg, guidance_scale=GUIDANCE, delta=DELTA, negative_prompt="")
            label = f"{mode.value} cfg {cfg.value}" + ("" if cfg is CfgType.NONE else f" (γ {GUIDANCE:g})")
            rows.append(_alignment_row(label, models, guided, sequence, judge))
    return rows


def measure_batch(
    models: ModelBundle, settings: PipelineSettings, judge: Judge, frames: int
) -> dict[str, float]:
    """Stream batch vs n sequential LCM steps per frame on the drifting test pattern (cfg none).

    The stream's output k finishes input k-(n-1); it is compared with the sequential result of
    that input. Returns both judge scores and the PSNR between the two (mean over frames).
    """
    inputs = pattern_frames(settings, models, frames)
    n = len(settings.t_index_list)
    stream_scores, sequential_scores, psnrs = [], [], []
    for prompt in PROMPTS:
        plain = replace(settings, prompt=prompt, cfg_type=CfgType.NONE)
        stream = finished_outputs(StreamPipeline(models, plain), inputs)
        sequential = finished_outputs(
            sequential_step(StreamPipeline(models, plain)), inputs[: len(inputs) - (n - 1)]
        )
        stream_scores.append(_score(judge, stream, prompt))
        sequential_scores.append(_score(judge, sequential, prompt))
        psnrs += [min(psnr(a, b), 99.0) for a, b in zip(stream, sequential)]
    return {
        "n": float(n),
        "stream_score": statistics.fmean(stream_scores),
        "sequential_score": statistics.fmean(sequential_scores),
        "psnr_db": statistics.fmean(psnrs),
    }


def measure_flicker(
    models: ModelBundle, settings: PipelineSettings, judge: Judge, frames: int
) -> list[FlickerClaim]:
    """Flicker and alignment with the feature cache and cross-frame attention off and on.

    Inputs: the test pattern's first frame drifting sideways one pixel a frame, and still;
    the first prompt; the similarity filter off. Cache pipelines switch their cache off at the end
    (its processors leave the shared UNet); cross-frame attention's processors are put back.
    """
    from engine.runtime.changes import apply_change

    base = replace(settings, similarity_filter_enabled=False, prompt=PROMPTS[0])
    still = pattern_frames(settings, models, frames, step=0)
    inputs = {
        "drifting": [torch.roll(frame, shifts=k, dims=3) for k, frame in enumerate(still)],
        "static": still,
    }
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "feature cache": {"feature_cache_enabled": True},
        "cross-frame attention": {"cross_frame_attention": True},
    }
    rows = []
    for input_name, sequence in inputs.items():
        for setting, change in variants.items():
            with _attention_restored(models):
                pipe = StreamPipeline(models, replace(base, **change))
                outputs = finished_outputs(pipe, sequence)
                if change.get("feature_cache_enabled"):
                    apply_change(pipe, {"feature_cache_enabled": False})
            rows.append(
                FlickerClaim(input_name, setting, mean_step(outputs), _score(judge, outputs, PROMPTS[0]))
            )
    return rows


def _first_change(outputs: Sequence[torch.Tensor], after: int) -> int:
    """The index of the first output at or after ``after`` that differs from the one before it."""
    for index in range(max(after, 1), len(outputs)):
        if float((outputs[index] - outputs[index - 1]).abs().mean()) * 255.0 > CHANGE_LEVEL:
            return index
    return len(outputs)


def measure_filter(models: ModelBundle, settings: PipelineSettings) -> dict[str, float]:
    """The similarity filter on a still test pattern that starts moving after ``STATIC_FRAMES``.

    Every call's output is kept (a skipped frame re-emits the last), so output k belongs to
    input k; the lag is how many frames later the filtered stream shows the motion than the
    unfiltered one does.
    """
    still = pattern_frames(settings, models, STATIC_FRAMES, step=0)
    moving = pattern_frames(settings, models, MOVING_FRAMES, start=1)
    frames = still + moving
    result: dict[str, float] = {}
    for name, enabled in (("off", False), ("on", True)):
        pipe = StreamPipeline(
            models,
            replace(
                settings,
                prompt=PROMPTS[0],
                similarity_filter_enabled=enabled,
                similarity_filter_threshold=FILTER_THRESHOLD,
            ),
        )
        outputs: list[torch.Tensor] = []
        calls_before_motion = 0
        for index, frame in enumerate(frames):
            if index == STATIC_FRAMES:
                calls_before_motion = pipe.stats.unet_calls
            out = pipe(frame)
            if out is not None:
                outputs.append(((out.float() + 1) / 2).cpu())
            elif outputs:
                outputs.append(outputs[-1])
        offset = len(frames) - len(outputs)  # the stream's first n-1 inputs give no output
        result[f"unet_calls_{name}"] = float(pipe.stats.unet_calls)
        result[f"static_calls_{name}"] = float(calls_before_motion)
        result[f"motion_seen_{name}"] = float(_first_change(outputs, STATIC_FRAMES - offset) + offset)
    result["saved_static"] = 1.0 - result["static_calls_on"] / max(result["static_calls_off"], 1.0)
    result["saved_total"] = 1.0 - result["unet_calls_on"] / max(result["unet_calls_off"], 1.0)
    result["lag_frames"] = result["motion_seen_on"] - result["motion_seen_off"]
    return result


def measure_prompt_change(
    models: ModelBundle, settings: PipelineSettings, judge: Judge, old: str = "green", new: str = "red"
) -> dict[str, float]:
    """How soon a new prompt shows: img2img on the drifting test pattern with ``old``, then
    ``new`` applied between two frames; the frames until the judge scores an output at least
    ``FOLLOWS`` for ``new``, and the milliseconds per frame here (their product: the delay on
    this machine, besides the prompt's encoding, which happens off the frame loop)."""
    from engine.runtime.changes import apply_change

    inputs = pattern_frames(settings, models, 40)
    pipe = StreamPipeline(models, replace(settings, prompt=old, similarity_filter_enabled=False))
    for frame in inputs[:10]:
        pipe(frame)
    apply_change(pipe, {"prompt": new})
    started = time.perf_counter()
    frames = 0
    for frame in inputs[10:]:
        frames += 1
        out = pipe(frame)
        if out is not None and float(judge.score((out.float().clamp(-1, 1) + 1) / 2, new)[0]) >= FOLLOWS:
            break
    ms = 1000.0 * (time.perf_counter() - started) / frames
    return {"frames": float(frames), "ms_per_frame": ms, "seconds": frames * ms / 1000.0}


def measure_claims(
    models: ModelBundle,
    settings: PipelineSettings,
    judge: Judge,
    frames: int = 24,
    say: Callable[[str], None] = lambda _text: None,
) -> ClaimsReport:
    """Every claim, on ``settings`` (its size and t_index_list; img2img on the test pattern), with
    ``frames`` frames per row (at least ``len(TXT2IMG_T_INDEX) + 2``)."""
    settings = replace(
        settings, mode=GenerationMode.IMG2IMG, cross_frame_attention=False, feature_cache_enabled=False
    )
    frames = max(frames, len(TXT2IMG_T_INDEX) + 2)  # every row finishes a few outputs
    report = ClaimsReport()
    say("claims: prompt alignment per guidance mode (judge)")
    report.alignment = measure_alignment(models, settings, judge, frames)
    say("claims: stream batch vs sequential")
    report.batch = measure_batch(models, settings, judge, frames)
    say("claims: flicker with the feature cache and cross-frame attention")
    report.flicker = measure_flicker(models, settings, judge, frames)
    say("claims: similarity filter, still then moving")
    report.filter = measure_filter(models, settings)
    say("claims: how soon a new prompt shows")
    report.prompt_change = measure_prompt_change(models, settings, judge)
    return report


def format_claims(report: ClaimsReport) -> str:
    """The claims table (one block per claim)."""
    lines = [
        f"claims: prompt alignment (judge score 0..1, mean of {len(PROMPTS)} prompts: "
        + ", ".join(repr(p) for p in PROMPTS)
        + f"; γ {GUIDANCE:g}, δ {DELTA:g})",
        f"  {'configuration':<34}{'score':>8}"
        + "".join(f"{'p' + str(i + 1):>8}" for i in range(len(PROMPTS))),
    ]
    for row in report.alignment:
        lines.append(f"  {row.name:<34}{row.score:>8.3f}" + "".join(f"{s:>8.3f}" for s in row.by_prompt))
    b = report.batch
    if b:
        lines.append("")
        lines.append(
            f"claims: stream batch (n={int(b['n'])}) vs sequential: score {b['stream_score']:.3f} vs "
            f"{b['sequential_score']:.3f}, PSNR between them "
            + ("99+ dB (identical)" if b["psnr_db"] >= 99.0 else f"{b['psnr_db']:.1f} dB")
        )
    if report.flicker:
        lines.append("")
        lines.append("claims: flicker (mean |Δ| of consecutive outputs, 0..255) and alignment")
        lines.append(f"  {'input':<10}{'setting':<24}{'|Δ|':>8}{'score':>8}")
        for claim in report.flicker:
            lines.append(f"  {claim.input:<10}{claim.setting:<24}{claim.mad:>8.3f}{claim.score:>8.3f}")
    f = report.filter
    if f:
        lines.append("")
        lines.append(
            f"claims: similarity filter (threshold {FILTER_THRESHOLD}) on {STATIC_FRAMES} still + "
            f"{MOVING_FRAMES} moving frames: UNet calls {int(f['unet_calls_off'])} → "
            f"{int(f['unet_calls_on'])} "
            f"({100 * f['saved_static']:.0f}% saved while still, {100 * f['saved_total']:.0f}% overall), "
            f"motion seen {f['lag_frames']:+.0f} frames later than without the filter"
        )
    c = report.prompt_change
    if c:
        lines.append(
            f"claims: a prompt change (green → red, img2img) is judged followed after {int(c['frames'])} "
            f"frames ({c['seconds']:.2f} s at {c['ms_per_frame']:.0f} ms/frame here)"
        )
    return "\n".join(lines)
