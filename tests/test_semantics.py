"""builtin:shapes follows its prompt (judged by the shipped classifier); random weights do not."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from engine.claims import TXT2IMG_T_INDEX, pattern_frames
from engine.judge.classifier import JUDGE_SHA256, JUDGE_WEIGHTS, Judge, load_judge
from engine.judge.drawings import PATTERNS, caption, random_drawing, render
from engine.models import trained
from engine.models.bundle import ModelBundle
from engine.models.loader import ModelRequest, load_models
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.modes import CfgType, GenerationMode

SIZE = trained.SHAPES_SIZE
FOLLOWS = 0.6
"""A judge score at or above this follows the prompt (random weights stay far below)."""
MOVES = 0.25
"""How far a prompt change in img2img must move the judge's scores (new up, old down) together."""


@pytest.fixture(scope="module")
def shapes() -> ModelBundle:
    return load_models(ModelRequest(id=trained.SHAPES_MODEL_ID, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


def _settings(**changes: object) -> PipelineSettings:
    base = PipelineSettings(
        width=SIZE,
        height=SIZE,
        t_index_list=[32, 45],
        cfg_type=CfgType.NONE,
        guidance_scale=1.0,
        negative_prompt="",
        seed=2,
        similarity_filter_enabled=False,
        feature_cache_enabled=False,
    )
    return replace(base, **changes)


def _pictures(pipe: StreamPipeline, frames: list[torch.Tensor | None]) -> torch.Tensor:
    """The finished outputs as ``(B, 3, H, W)`` in [0, 1]."""
    outputs = [pipe(frame) for frame in frames]
    return (torch.cat([out for out in outputs if out is not None]).clamp(-1, 1) + 1) / 2


def _txt2img_score(models: ModelBundle, judge: Judge, prompt: str, **changes: object) -> float:
    settings = _settings(mode=GenerationMode.TXT2IMG, t_index_list=TXT2IMG_T_INDEX, prompt=prompt, **changes)
    return float(judge.score(_pictures(StreamPipeline(models, settings), [None] * 6), prompt).mean())


# ---------------------------------------------------------------- the weights


def test_trained_weights_are_the_shipped_ones_bit_exactly(shapes: ModelBundle) -> None:
    assert trained.file_sha256(trained.SHAPES_WEIGHTS) == trained.SHAPES_SHA256
    assert hashlib.sha256(JUDGE_WEIGHTS.read_bytes()).hexdigest() == JUDGE_SHA256
    stored = load_file(str(trained.SHAPES_WEIGHTS))
    for prefix, module in (
        ("unet.", shapes.unet),
        ("vae.", shapes.vae),
        ("text_encoder.", shapes.text_encoder),
    ):
        state = module.state_dict()
        for key, value in state.items():
            assert torch.equal(value, stored[prefix + key].float()), prefix + key
    assert shapes.vae_scaling_factor != 1.0  # the measured latent scale, not TAESD's default


def test_the_judge_names_fresh_drawings() -> None:
    rng = random.Random(12345)
    drawings = [random_drawing(rng) for _ in range(96)]
    pictures = torch.stack([render(d, SIZE, rng) for d in drawings])
    for name, judge in (("trained", load_judge()), ("untrained", Judge().eval())):
        pattern_logits, _colors = judge(pictures)
        right = sum(
            PATTERNS[int(i)] == d.pattern for i, d in zip(pattern_logits.argmax(1), drawings, strict=True)
        )
        scores = torch.cat(
            [judge.score(pictures[i : i + 1], caption(d, rng)) for i, d in enumerate(drawings)]
        )
        if name == "trained":
            assert right / len(drawings) > 0.9 and float(scores.mean()) > 0.8
        else:  # the same check fails with random weights
            assert right / len(drawings) < 0.5 and float(scores.mean()) < 0.8


# ---------------------------------------------------------------- meaning


@pytest.mark.parametrize("prompt", ["red", "blue", "yellow"])
def test_a_colour_prompt_makes_a_picture_of_that_colour(
    prompt: str, shapes: ModelBundle, tiny: ModelBundle, judge: Judge
) -> None:
    assert _txt2img_score(shapes, judge, prompt) >= FOLLOWS
    assert _txt2img_score(tiny, judge, prompt) < FOLLOWS  # random weights fail the same check


def _prompt_change(models: ModelBundle, judge: Judge, old: str, new: str) -> tuple[float, float]:
    """img2img on the test pattern: how much the judge's score for ``new`` rises and for ``old``
    falls when the prompt changes from ``old`` to ``new`` (mean over the outputs after each)."""
    pipe = StreamPipeline(models, _settings(prompt=old))
    frames = pattern_frames(pipe.settings, models, 12)
    before = _pictures(pipe, list(frames[:6]))
    apply_change(pipe, {"prompt": new})
    after = _pictures(pipe, list(frames[6:]))[1:]  # the first output after the change was half made before it
    rise = float(judge.score(after, new).mean() - judge.score(before, new).mean())
    fall = float(judge.score(before, old).mean() - judge.score(after, old).mean())
    return rise, fall


@pytest.mark.parametrize(("old", "new"), [("red", "blue"), ("green", "pink"), ("red", "blue stripes")])
def test_changing_the_prompt_in_img2img_moves_the_picture_toward_it(
    old: str, new: str, shapes: ModelBundle, tiny: ModelBundle, judge: Judge
) -> None:
    rise, fall = _prompt_change(shapes, judge, old, new)
    assert rise >= MOVES and fall >= MOVES, (rise, fall)
    tiny_rise, tiny_fall = _prompt_change(tiny, judge, old, new)
    assert tiny_rise < MOVES or tiny_fall < MOVES  # random weights fail the same check


@pytest.mark.parametrize("prompt", ["purple", "a yellow circle on a purple background"])
def test_full_guidance_aligns_at_least_as_well_as_none(
    prompt: str, shapes: ModelBundle, tiny: ModelBundle, judge: Judge
) -> None:
    def scores(models: ModelBundle) -> tuple[float, float]:
        none = _txt2img_score(models, judge, prompt)
        full = _txt2img_score(models, judge, prompt, cfg_type=CfgType.FULL, guidance_scale=2.0)
        return none, full

    none, full = scores(shapes)
    assert full >= none - 0.02 and full >= FOLLOWS, (none, full)
    tiny_none, tiny_full = scores(tiny)
    assert not (tiny_full >= tiny_none - 0.02 and tiny_full >= FOLLOWS)  # random weights fail it
