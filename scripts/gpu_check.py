"""The GPU check: sd-turbo-shape at 512² in float16 (eager, compile, CUDA graphs) beside the peers.

Run by ``scripts/gpu-check.sh`` (which installs the wheels and runs the CUDA tests first):

    python scripts/gpu_check.py --out DIR            # on the accelerator machine
    python scripts/gpu_check.py --out DIR --cpu      # the dry run: builtin:tiny on the CPU

Writes ``DIR/gpu-check.json`` (after every section, so a run cut short keeps what it measured)
and ``DIR/gpu-check.md`` (the tables for BENCHMARKS.md). Sections, in order of importance:

1. precision: float32 reference frames, then the same weights in float16 (or bfloat16 on the
   CPU): NaN/inf count, max and mean absolute difference, PSNR;
2. peers, for n = 1 and 2 (cfg self, γ 1.2): latentstage on torch eager, the floor,
   diffusers' img2img (defaults, + TAESD) and the paper's code, interleaved round by round;
3. acceleration, for n = 1 and 2: torch eager, ``torch.compile`` and CUDA graphs
   (``mode="reduce-overhead"``) side by side; each one's frames against eager's, the time of
   its first frames (compiling) and its GPU memory peak.

A time budget (``--budget-s``) skips what would not fit and says so in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine import contenders
from engine.accel.backends import TorchBackend
from engine.bench import ROUNDS, frames_for, machine_facts, time_contenders
from engine.contenders import Contender
from engine.models.bundle import ModelBundle
from engine.models.loader import ModelRequest, load_models, load_vae
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import open_pipeline
from engine.stream.modes import CfgType

logger = logging.getLogger("gpu_check")

T_INDEX_LISTS = {1: [45], 2: [32, 45]}
PROMPT = "a city street at night, neon signs, rain"


@dataclasses.dataclass
class Plan:
    """What one run measures (``--cpu`` shrinks it to a dry run on the tiny model)."""

    model: str
    device: str
    size: int
    low: torch.dtype
    frames: int
    warmup: int
    compile_backend: str

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        if args.cpu:
            return cls("builtin:tiny", "cpu", 64, torch.bfloat16, 2, 1, args.compile_backend or "aot_eager")
        return cls(
            "builtin:sd-turbo-shape", "cuda", 512, torch.float16, 10, 3, args.compile_backend or "inductor"
        )


class Report:
    """The JSON being built, written out after every section."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"sections": {}, "skipped": [], "errors": []}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def fits(self, what: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        self.data["skipped"].append(f"{what}: {self.left():.0f} s left of the budget, needs ~{needs_s:.0f} s")
        logger.warning("skipped %s (time budget)", what)
        return False

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")


def _settings(plan: Plan, n: int) -> PipelineSettings:
    return PipelineSettings(
        width=plan.size,
        height=plan.size,
        t_index_list=T_INDEX_LISTS[n],
        cfg_type=CfgType.SELF,
        guidance_scale=1.2,
        delta=1.0,
        prompt=PROMPT,
    )


def _run_frames(pipe: StreamPipeline, frames: list[torch.Tensor]) -> torch.Tensor:
    out = None
    for frame in frames:
        out = pipe(frame)
    assert out is not None
    return out.float().cpu()


def _difference(test: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Agreement of two ``(1, 3, H, W)`` frames in [-1, 1]: NaN/inf count, max/mean |Δ|, PSNR (dB)."""
    bad = int((~torch.isfinite(test)).sum())
    delta = (torch.nan_to_num(test) - reference).abs()
    mse = float((delta**2).mean())
    return {
        "nonfinite": bad,
        "max_abs": round(float(delta.max()), 5),
        "mean_abs": round(float(delta.mean()), 6),
        "psnr_db": round(10 * math.log10(4.0 / mse), 2) if mse > 0 else float("inf"),
    }


def _peak_memory(step: Any, frames: list[torch.Tensor], device: torch.device) -> float | None:
    """GiB allocated at most while ``step`` runs ``frames`` (weights included); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for frame in frames:
        step(frame)
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def precision(plan: Plan, report: Report) -> ModelBundle:
    """Float32 reference frames, then the same weights in the low dtype; returns the low bundle."""
    started = time.monotonic()
    full = load_models(ModelRequest(id=plan.model, device=plan.device, dtype="float32"))
    report.data["model_load_s"] = round(time.monotonic() - started, 1)
    references = {}
    for n in T_INDEX_LISTS:
        settings = _settings(plan, n)
        frames = frames_for(settings, full, n + 3, moving=True)
        references[n] = (_run_frames(StreamPipeline(full, settings), frames), frames)
    for module in (full.unet, full.vae, full.text_encoder):
        module.to(dtype=plan.low)
    low = dataclasses.replace(full, dtype=plan.low)
    section = {}
    for n, (reference, frames) in references.items():
        settings = _settings(plan, n)
        test = _run_frames(StreamPipeline(low, settings), [frame.to(plan.low) for frame in frames])
        section[f"n={n}"] = _difference(test, reference)
    report.data["sections"]["precision"] = {"dtype": str(plan.low).removeprefix("torch."), **section}
    report.save()
    return low


def _timed(entries: list[Contender], frames: list[torch.Tensor], plan: Plan, section: dict[str, Any]) -> None:
    """Time ``entries`` side by side into ``section["rows"]`` (ratios to the first entry)."""
    rows = time_contenders(entries, frames, plan.warmup, ROUNDS, section["name"], entries[0].key)
    section["rows"] += [row.as_json() for row in rows]


def _section(report: Report, name: str, settings: PipelineSettings) -> dict[str, Any]:
    section: dict[str, Any] = {"name": name, "t_index_list": settings.t_index_list, "cfg": "self", "rows": []}
    report.data["sections"][name] = section
    return section


def peers(models: ModelBundle, plan: Plan, n: int, report: Report) -> None:
    """One n: latentstage (torch eager), the floor, diffusers (defaults, + TAESD), the paper's code."""
    settings = _settings(plan, n)
    frames = frames_for(settings, models, plan.frames + plan.warmup, moving=True)
    section = _section(report, f"peers n={n}", settings)
    pipe = StreamPipeline(models, settings)
    entries = [contenders.latentstage(pipe), contenders.floor(StreamPipeline(models, settings))]
    full_vae = load_vae(ModelRequest(id=plan.model), "full", models.device, models.dtype)
    entries += contenders.diffusers_pair(models, full_vae, models.vae, settings, pipe)
    reason = contenders.streamdiffusion_unavailable()
    if reason is None:
        entries.append(contenders.streamdiffusion(models, settings))
    elif f"paper's code: {reason}" not in report.data["skipped"]:
        report.data["skipped"].append(f"paper's code: {reason}")
    section["peak_gib"] = {"latentstage": _peak_memory(pipe, frames[:3], models.device)}
    _timed(entries, frames, plan, section)
    report.save()


def _backends(models: ModelBundle, plan: Plan, report: Report) -> list[tuple[str, TorchBackend]]:
    variants = [("compile", TorchBackend(models, compile_unet=True, compile_backend=plan.compile_backend))]
    if models.device.type == "cuda":
        variants.append(
            ("cuda graphs", TorchBackend(models, cuda_graph=True, compile_backend=plan.compile_backend))
        )
    elif "cuda graphs: needs CUDA" not in report.data["skipped"]:
        report.data["skipped"].append("cuda graphs: needs CUDA")
    return variants


def acceleration(models: ModelBundle, plan: Plan, n: int, report: Report) -> None:
    """One n: torch eager, ``torch.compile`` and CUDA graphs side by side; their frames vs eager's;
    the time of the first frames (compiling, recording graphs); each one's memory peak."""
    settings = _settings(plan, n)
    frames = frames_for(settings, models, plan.frames + plan.warmup, moving=True)
    section = _section(report, f"accel n={n}", settings)
    eager = StreamPipeline(models, settings)
    eager_out = _run_frames(eager, frames[: n + 2])
    entries = [Contender("eager", "latentstage, torch eager", eager)]
    section["peak_gib"] = {"eager": _peak_memory(eager, frames[:3], models.device)}
    section["first_frames_s"] = {}
    section["versus_eager"] = {}
    for name, backend in _backends(models, plan, report):
        if not report.fits(f"n={n} {name}", 150 if plan.device == "cuda" else 20):
            continue
        pipe = open_pipeline(models, settings, backend)
        started = time.monotonic()
        try:
            out = _run_frames(pipe, frames[: n + 2])  # the first frames compile and record graphs
        # a check script: one variant that cannot compile must not cost the other figures;
        # the failure goes into the JSON with its type and text, and the log has the traceback
        except Exception as err:
            logger.exception("n=%d %s failed", n, name)
            report.data["errors"].append(f"n={n} {name}: {type(err).__name__}: {err}")
            report.save()
            continue
        section["first_frames_s"][name] = round(time.monotonic() - started, 1)
        section["versus_eager"][name] = _difference(out, eager_out)
        section["peak_gib"][name] = _peak_memory(pipe, frames[:3], models.device)
        entries.append(Contender(name, f"latentstage, torch {name}", pipe))
        report.save()
    if len(entries) > 1:
        _timed(entries, frames, plan, section)
    report.save()


def table(report: Report) -> str:
    """The markdown for BENCHMARKS.md: ms/frame, fps, min–max and the first row's speed-up over each."""
    facts = report.data["machine"]
    lines = [
        f"{facts['hardware']}, torch {facts['torch']}, {facts['model']} in {facts['dtype']}, "
        f"{report.data['size']}x{report.data['size']}, cfg self γ 1.2",
        "",
        "| section | configuration | ms/frame | fps | min-max ms | first row's speed-up over it "
        "| first frames (s) | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, section in report.data["sections"].items():
        if "rows" not in section:
            continue
        for row in section["rows"]:
            first = section.get("first_frames_s", {}).get(row["key"], "")
            peak = section.get("peak_gib", {}).get(row["key"])
            lines.append(
                f"| {name} | {row['name']} | {row['ms']:.2f} | {row['fps']:.1f} | "
                f"{row['min_ms']:.2f}-{row['max_ms']:.2f} | {1 / row['ratio']:.2f}x | {first} | "
                f"{'' if peak is None else peak} |"
            )
    precision = report.data["sections"].get("precision")
    if precision:
        lines += [
            "",
            f"| n | {precision['dtype']} vs float32 | non-finite | max abs | mean abs | PSNR dB |",
            "|---|---|---|---|---|---|",
        ]
        for n in T_INDEX_LISTS:
            d = precision.get(f"n={n}")
            if d:
                lines.append(
                    f"| {n} | last of {n + 3} frames | {d['nonfinite']} | {d['max_abs']} "
                    f"| {d['mean_abs']} | {d['psnr_db']} |"
                )
    lines.append("")
    for name, section in report.data["sections"].items():
        for variant, d in section.get("versus_eager", {}).items():
            lines.append(
                f"- {name}, {variant} vs eager: max abs {d['max_abs']}, mean abs {d['mean_abs']}, "
                f"non-finite {d['nonfinite']}"
            )
    for skipped in report.data["skipped"]:
        lines.append(f"- skipped {skipped}")
    for error in report.data["errors"]:
        lines.append(f"- error {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--cpu", action="store_true", help="dry run: builtin:tiny at 64x64 on the CPU")
    parser.add_argument("--budget-s", type=float, default=400.0, help="time for this script (s)")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; --cpu: aot_eager)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plan = Plan.for_args(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the dry run", file=sys.stderr)
        return 2
    report = Report(args.out, args.budget_s)
    report.data.update({"plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()}, "size": plan.size})
    low = precision(plan, report)
    report.data["machine"] = machine_facts(low)
    for n in T_INDEX_LISTS:
        peers(low, plan, n, report)
    for n in T_INDEX_LISTS:
        acceleration(low, plan, n, report)
    if low.device.type == "cuda":
        report.data["peak_gib_overall"] = round(torch.cuda.max_memory_allocated(low.device) / 2**30, 3)
    report.save()
    markdown = table(report)
    (args.out / "gpu-check.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
