"""builtin:shapes as a builtin (loading, clear refusals), its drawings, the claims bench and output_scale."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.claims import PROMPTS, measure_claims
from engine.cli import main
from engine.config import ConfigError, load_config
from engine.imageops import upsample
from engine.judge.classifier import Judge
from engine.judge.drawings import COLOR_NAMES, Drawing, caption, parse_prompt, random_drawing, render
from engine.models import builtin, trained
from engine.models.errors import ModelLoadError
from engine.models.loader import ModelRequest, load_models, load_vae
from engine.models.sources import SourceKind, classify_source
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine, EngineOptions
from tests.fakes import FakeSource, RecordingSink, pipeline_settings, wait_until


def _cpu(**kwargs: object) -> ModelRequest:
    return ModelRequest(id=trained.SHAPES_MODEL_ID, device="cpu", dtype="float32", **kwargs)  # type: ignore[arg-type]


def test_shapes_is_a_builtin_everywhere() -> None:
    assert classify_source("builtin:shapes") is SourceKind.BUILTIN
    assert load_config(None, overrides=["model.id=builtin:shapes"]).model.id == "builtin:shapes"
    bundle = load_models(_cpu())
    assert bundle.unet.config.sample_size == trained.SHAPES_SIZE // 8
    assert bundle.text_encoder.config.hidden_size == trained.SHAPES_TEXT_CONFIG["hidden_size"]
    assert not any(p.requires_grad for p in bundle.unet.parameters())


def test_shapes_refuses_what_it_was_not_trained_for() -> None:
    with pytest.raises(ModelLoadError, match="only its trained TAESD: use vae: taesd"):
        load_models(_cpu(vae="full"))
    with pytest.raises(ModelLoadError, match="predicts epsilon; prediction_type 'v_prediction'"):
        load_models(_cpu(prediction_type="v_prediction"))
    # the bench's diffusers peer still gets a (random) full VAE to time
    assert type(load_vae(_cpu(), "full", torch.device("cpu"), torch.float32)).__name__ == "AutoencoderKL"


def test_missing_weights_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = replace(builtin.BUILTIN_SPECS["shapes"], weights=tmp_path / "gone.safetensors")
    monkeypatch.setitem(builtin.BUILTIN_SPECS, "shapes", spec)
    with pytest.raises(ModelLoadError, match=re.escape("scripts/train_builtin.py")):
        load_models(_cpu())


def test_drawings_are_seeded_and_captions_name_what_is_drawn() -> None:
    first = render(Drawing("circle", "red", "blue"), 64, random.Random(3))
    assert torch.equal(first, render(Drawing("circle", "red", "blue"), 64, random.Random(3)))
    assert first.shape == (3, 64, 64) and float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    rng = random.Random(5)
    for _ in range(200):
        drawing = random_drawing(rng)
        colors, pattern = parse_prompt(caption(drawing, rng))
        assert colors[0] == drawing.fg
        assert pattern == (None if drawing.pattern == "solid" else drawing.pattern)
        if drawing.bg_named and drawing.bg is not None:
            assert colors == (drawing.fg, drawing.bg)
    assert parse_prompt("A Red circle, on a BLUE background") == (("red", "blue"), "circle")


def test_the_judge_refuses_a_prompt_it_cannot_read() -> None:
    with pytest.raises(ValueError, match=re.escape("cannot score 'a neon jellyfish'")) as caught:
        Judge().score(torch.zeros(1, 3, 32, 32), "a neon jellyfish")
    assert COLOR_NAMES[0] in str(caught.value)


def test_claims_report_every_row(bundle) -> None:
    settings = pipeline_settings(t_index_list=[32, 45])
    report = measure_claims(bundle, settings, Judge().eval(), frames=4)
    names = [row.name for row in report.alignment]
    assert names[0] == "img2img input (no diffusion)" and len(names) == 9
    assert all(len(row.by_prompt) == len(PROMPTS) and 0 <= row.score <= 1 for row in report.alignment)
    # with a constant input the stream equals the sequential steps; on the drifting pattern the
    # stream's output k is input k-(n-1) denoised the same way: the two agree
    assert report.batch["n"] == 2 and report.batch["psnr_db"] > 40
    assert [(c.input, c.setting) for c in report.flicker][:3] == [
        ("drifting", "plain"),
        ("drifting", "feature cache"),
        ("drifting", "cross-frame attention"),
    ]
    static_plain = next(c for c in report.flicker if (c.input, c.setting) == ("static", "plain"))
    assert static_plain.mad == 0.0  # still input, no filter: the same picture every frame
    f = report.filter
    assert f["unet_calls_on"] < f["unet_calls_off"] and f["saved_static"] > 0.3 and f["lag_frames"] >= 0
    change = report.prompt_change
    assert 1 <= change["frames"] <= 30 and change["seconds"] > 0
    # the shared UNet is left as it was: no cross-frame or cache processors stay on it
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in bundle.unet.attn_processors.values())


def test_bench_claims_group_prints_the_table(capsys) -> None:
    args = ["bench", "--preset", "demo", "--groups", "claims", "--frames", "3", "--warmup", "1"]
    args += ["--set", "stream.width=64", "--set", "stream.height=64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for text in (
        "claims: prompt alignment",
        "img2img cfg onetime",
        "stream batch (n=2) vs sequential",
        "cross-frame attention",
        "claims: similarity filter",
        "claims: a prompt change",
    ):
        assert text in out, text


def test_output_scale_upsamples_every_output(bundle) -> None:
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    assert upsample(image, 1) is image and upsample(image, 3).shape == (1, 3, 24, 24)
    pipe = StreamPipeline(bundle, pipeline_settings())
    sink = RecordingSink()
    engine = Engine(pipe, lambda: FakeSource(fps=20), [("rec", lambda: sink)], EngineOptions(output_scale=2))
    with engine:
        engine.run(max_frames=4)
    assert wait_until(lambda: len(sink.frames) >= 1)
    assert {frame.pixels.shape for frame in sink.frames} == {(128, 128, 4)}
    with pytest.raises(ConfigError, match="output_scale"):
        load_config(None, overrides=["stream.output_scale=5"])
