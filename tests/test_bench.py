"""`latentstage bench`: every group of rows, the compare rows and their JSON, peers doing the same work."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from engine import contenders
from engine.cli import main
from engine.models.loader import ModelRequest, load_models
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.stream.modes import CfgType


def test_bench_prints_all_groups(capsys, tmp_path):
    args = ["bench", "--preset", "demo", "--frames", "2", "--warmup", "1", "--steps", "1"]
    args += ["--set", "stream.width=64", "--set", "stream.height=64"]
    args += ["--set", f"acceleration.engine_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in (
        "sequential n=1",
        "stream batch n=1",
        "cfg full (batch 4)",
        "cfg self (batch 2)",
        "filter on",
        "torch eager",
        "no ControlNet",
        "1 ControlNet",
        "2 ControlNets",
    ):
        assert name in out, name
    rows = [line for line in out.splitlines() if re.search(r"\d+\.\d\dx$", line)]
    assert len(rows) >= 11
    assert all(float(line.split()[-1].rstrip("x")) > 0 for line in rows)


def test_bench_refuses_bad_steps(capsys):
    assert main(["bench", "--preset", "demo", "--steps", "0,2"]) == 2
    assert main(["bench", "--preset", "demo", "--steps", "a"]) == 2


SMALL = ["--set", "stream.width=64", "--set", "stream.height=64"]


def _compare_json(tmp_path, capsys, peers: str, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "demo", "--compare", peers, "--groups", "compare", "--frames", "2"]
    args += ["--warmup", "1", *SMALL, "--json", str(out), *extra]
    assert main(args) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_compare_with_diffusers_writes_ratios_overhead_and_latency(tmp_path, capsys):
    data = _compare_json(tmp_path, capsys, "diffusers")
    rows = {row["key"]: row for row in data["rows"]}
    assert set(rows) == {"latentstage", "floor", "diffusers", "diffusers_taesd"}
    assert all(row["group"] == "compare" and len(row["round_ms"]) == 3 for row in rows.values())
    assert all(row["min_ms"] <= row["ms"] <= row["max_ms"] for row in rows.values())
    summary = data["summary"]
    # the headline figures are the rows' own ratios, not separate measurements
    assert summary["overhead"] == pytest.approx(rows["floor"]["fps"] / rows["latentstage"]["fps"], rel=1e-3)
    assert summary["speedup_vs_diffusers"] == pytest.approx(
        rows["latentstage"]["fps"] / rows["diffusers"]["fps"], rel=1e-3
    )
    assert "speedup_vs_diffusers_taesd" in summary
    ratios = data["ratios"]  # every row against every baseline
    assert set(ratios) == set(rows) and set(ratios["floor"]) == {"diffusers", "diffusers_taesd", "floor"}
    assert ratios["latentstage"]["diffusers"] == pytest.approx(summary["speedup_vs_diffusers"], rel=1e-3)
    assert ratios["floor"]["floor"] == 1.0
    assert rows["diffusers"]["ratio"] == pytest.approx(1.0)  # the compare group's baseline
    assert data["latency"]["frames"] >= 3 and data["latency"]["mean_ms"] > 0
    assert data["settings"]["t_index_list"] == [40, 45]
    assert data["device"] == "cpu" and data["model"] == "builtin:shapes"


def test_a_missing_paper_code_is_one_skip_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamdiffusion", None)  # import raises ImportError
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "demo", "--compare", "streamdiffusion", "--groups", "compare"]
    args += ["--frames", "1", "--warmup", "0", "--latency-frames", "0", *SMALL, "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    skip_lines = [line for line in text.splitlines() if line.startswith("skipped streamdiffusion")]
    assert len(skip_lines) == 1 and "pip install --no-deps streamdiffusion==0.1.1" in skip_lines[0]
    data = json.loads(out.read_text())
    assert {row["key"] for row in data["rows"]} == {"latentstage", "floor"}
    assert "streamdiffusion" in data["skipped"] and data["latency"] == {}


def test_bench_refuses_unknown_peers_and_groups(capsys):
    assert main(["bench", "--preset", "demo", "--compare", "automatic1111"]) == 2
    assert "'automatic1111': allowed: diffusers, streamdiffusion" in capsys.readouterr().err
    assert main(["bench", "--preset", "demo", "--groups", "denoising,speed"]) == 2
    allowed = "'speed': allowed: denoising, guidance, filter, backend, controlnet, flicker, compare"
    assert allowed in capsys.readouterr().err
    assert main(["bench", "--preset", "demo", "--groups", ","]) == 2
    assert main(["bench", "--preset", "demo", "--latency-frames", "-1"]) == 2


def _tiny(cfg: CfgType, t_index_list: list[int], size: int = 64):
    models = load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))
    settings = PipelineSettings(
        width=size, height=size, t_index_list=t_index_list, cfg_type=cfg, guidance_scale=1.2, prompt="a cat"
    )
    return models, settings


def test_diffusers_contender_runs_latentstage_timesteps_with_full_cfg():
    """The diffusers row does the same steps: our timesteps, and (no residual CFG there) batch 2."""
    models, settings = _tiny(CfgType.SELF, [32, 45])
    pipe = StreamPipeline(models, settings)
    timesteps = [int(t) for t in pipe.batch.schedule.timesteps.tolist()]
    calls: list[tuple[int, list[int]]] = []

    def record(_module, args, kwargs):
        sample, t = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.shape[0], [int(v) for v in torch.atleast_1d(t).tolist()]))

    hook = models.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        contender = contenders.diffusers_img2img(models, models.vae, settings, timesteps, "d", "d")
        out = contender.step(torch.rand(1, 3, 64, 64))
    finally:
        hook.remove()
    assert timesteps == [359, 99]
    assert [batch for batch, _ in calls] == [2, 2]
    assert [t[0] for _, t in calls] == timesteps
    assert tuple(out.shape) == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("cfg", "t_index_list"),
    [(CfgType.NONE, [45]), (CfgType.NONE, [32, 45]), (CfgType.SELF, [32, 45]), (CfgType.ONETIME, [32, 45])],
)
def test_the_paper_code_gives_latentstage_frames(cfg, t_index_list):
    """Same models, noise (both draw it from the seed) and constant input: the paper's code and
    latentstage make the same frames, so the bench compares the same computation. (cfg self at
    n = 1 is left out: there the paper's residual noise breaks its own invariant S = (x − a·z)/b,
    which latentstage keeps, so the frames differ by design.)"""
    pytest.importorskip("streamdiffusion", reason=contenders.STREAMDIFFUSION_INSTALL)
    models, settings = _tiny(cfg, t_index_list)
    ours = StreamPipeline(models, settings)
    peer = contenders.streamdiffusion(models, settings)
    frame = torch.rand(1, 3, 64, 64) * 2 - 1
    for index in range(4):
        mine = ours(frame)
        theirs = peer.step(frame * 0.5 + 0.5)
        if index < len(t_index_list) - 1:
            assert mine is None  # our stream is still filling; theirs emits unfinished frames
            continue
        assert mine is not None
        error = (theirs.clamp(-1, 1) - mine).norm() / mine.norm()
        assert float(error) < 1e-5, (index, float(error))



def test_the_flicker_table_compares_the_feature_cache_off_and_on(tmp_path, capsys):
    out = tmp_path / "flicker.json"
    args = ["bench", "--preset", "demo", "--groups", "flicker", "--frames", "4", "--warmup", "1", *SMALL]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flicker: mean |Δ| between consecutive outputs" in text
    rows = {row["input"]: row for row in json.loads(out.read_text())["flicker"]}
    assert set(rows) == {"slowly moving", "static (filter off)"}
    assert rows["static (filter off)"]["mad_off"] == 0.0, "a static input without the cache: the same frame"
    assert rows["static (filter off)"]["mad_on"] > 0.0, "the cache fills over the first frames"
    assert rows["slowly moving"]["mad_off"] > 0.0
    assert all(row["ms_on"] > 0 and row["ms_off"] > 0 for row in rows.values())


def test_the_modulation_group_times_the_engine_loop_with_0_and_4_modulators(tmp_path, capsys):
    out = tmp_path / "modulation.json"
    args = ["bench", "--preset", "demo", "--set", "model.id=builtin:tiny", "--groups", "modulation"]
    args += ["--frames", "2", "--warmup", "1", "--rounds", "2", *SMALL, "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("modulation ")]
    assert [" ".join(line.split()[1:5]) for line in lines] == [
        "engine loop, 0 modulators",
        "engine loop, 4 modulators",
    ]
    assert all(math.isfinite(float(line.split()[-1].rstrip("x"))) for line in lines)
    assert "step = Music.frame + Engine._modulate" in text
    data = json.loads(out.read_text())
    rows = {row["name"]: row for row in data["rows"] if row["group"] == "modulation"}
    assert set(rows) == {"engine loop, 0 modulators", "engine loop, 4 modulators"}
    assert all(len(row["round_ms"]) == 2 and math.isfinite(row["ratio"]) for row in rows.values())
    none, four = data["modulation"]
    assert (none["modulators"], four["modulators"]) == (0, 4)
    assert math.isfinite(four["time_ratio"]) and none["time_ratio"] == 1.0
    assert math.isfinite(four["paired_time_ratio"]) and none["paired_time_ratio"] == 1.0
    assert all(row["step_ms"] >= 0 and row["frames"] == 4 for row in (none, four))
    # the modulators really ran on the frame loop: every timed frame committed moved values
    assert none["commits"] == 0 and four["commits"] == 4


def test_the_feedback_group_times_the_engine_loop_with_the_feedback_off_and_on(tmp_path, capsys):
    out = tmp_path / "feedback.json"
    args = ["bench", "--preset", "demo", "--set", "model.id=builtin:tiny", "--groups", "feedback"]
    args += ["--frames", "2", "--warmup", "1", "--rounds", "2", *SMALL, "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("feedback ")]
    assert [" ".join(line.split()[1:5]) for line in lines] == [
        "engine loop, feedback off",
        "engine loop, feedback on",
    ]
    assert all(math.isfinite(float(line.split()[-1].rstrip("x"))) for line in lines)
    assert "step = Engine._feed_back" in text
    data = json.loads(out.read_text())
    off, on = data["feedback"]
    assert (off["name"], on["name"]) == ("off (amount 0)", "amount 0.5, zoom 1.02, rotate 1")
    assert off["time_ratio"] == 1.0 and off["paired_time_ratio"] == 1.0
    assert math.isfinite(on["time_ratio"]) and math.isfinite(on["paired_time_ratio"])
    assert all(row["frames"] == 4 and row["step_ms"] >= 0 for row in (off, on))
    # the feedback really ran on the frame loop: every timed frame with it on was fed
    assert off["fed"] == 0 and on["fed"] == 4
