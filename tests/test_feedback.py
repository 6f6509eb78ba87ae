"""The feedback loop: the transform's measured properties, the mix, the engine's frame loop with it
(img2img and txt2img, resets, modulation) and its OSC and config surface."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pythonosc.osc_message_builder import OscMessageBuilder

from bridges.base import Frame
from engine import params
from engine.control.dispatch import OscDispatcher
from engine.control.state import ControlState
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine, EngineOptions
from engine.runtime.workers import OutputItem, OutputKind
from engine.stream.feedback import PADDING_MODE, Feedback, FeedbackTransform
from engine.stream.modes import GenerationMode
from tests.fakes import SIZE, FakeSource, RecordingSink, pipeline_settings

# ----------------------------------------------------------------------------- pictures and measures


def dot(height: int, width: int, x: float, y: float, sigma: float = 1.5) -> torch.Tensor:
    """A bright gaussian dot at pixel (x, y) on black, ``(1, 3, H, W)`` in [-1, 1]."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    blob = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return (blob * 2 - 1).expand(1, 3, height, width).contiguous()


def centroid(picture: torch.Tensor) -> tuple[float, float]:
    """The brightness centroid (x right, y up as seen) in pixels from the picture's centre."""
    weight = (picture[0].mean(0) + 1) / 2  # black weighs 0
    height, width = weight.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    total = weight.sum()
    cx = float((weight * xs).sum() / total) - (width - 1) / 2
    cy = float((weight * ys).sum() / total) - (height - 1) / 2
    return cx, -cy


def apply(transform: FeedbackTransform, picture: torch.Tensor, times: int) -> list[torch.Tensor]:
    """``picture`` fed back ``times`` times through ``transform`` alone (amount 1): each frame's."""
    feedback, frames = Feedback(), []
    for _ in range(times):
        picture = feedback.transform(picture, transform).clone()
        frames.append(picture)
    return frames


# ----------------------------------------------------------------------------- the transform


def test_zoom_above_1_moves_a_dot_outward_frame_by_frame():
    start = dot(64, 64, 31.5 + 6, 31.5 + 4)  # right of and below the centre
    radii = [math.hypot(*centroid(start))]
    radii += [math.hypot(*centroid(frame)) for frame in apply(FeedbackTransform(zoom=1.1), start, 8)]
    assert all(b > a for a, b in itertools.pairwise(radii)), radii
    assert radii[-1] / radii[0] == pytest.approx(1.1**8, rel=0.05)  # at the zoom's own rate
    below = [math.hypot(*centroid(frame)) for frame in apply(FeedbackTransform(zoom=0.9), start, 4)]
    assert all(b < a for a, b in zip([radii[0], *below], below)), "below 1 it moves inward"


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_rotation_moves_a_dot_by_the_angle_counter_clockwise_and_keeps_its_distance(height, width):
    cx, cy = (width - 1) / 2, (height - 1) / 2
    start = dot(height, width, cx + 12, cy)  # straight right of the centre
    frames = apply(FeedbackTransform(rotate=30.0), start, 3)
    for step, frame in enumerate(frames, start=1):
        x, y = centroid(frame)
        assert math.degrees(math.atan2(y, x)) == pytest.approx(30.0 * step, abs=1.5)  # up = counter-clockwise
        assert math.hypot(x, y) == pytest.approx(12.0, abs=0.5)  # square pixels on a wide picture too


def test_translation_moves_right_and_up_by_fractions_of_the_size():
    start = dot(40, 80, 39.5, 19.5)
    x, y = centroid(apply(FeedbackTransform(translate=(0.1, 0.1)), start, 1)[0])
    assert (x, y) == (pytest.approx(8.0, abs=0.2), pytest.approx(4.0, abs=0.2))


def test_hue_120_maps_red_to_green_and_keeps_greys():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8).contiguous()
    green = Feedback().transform(red, FeedbackTransform(hue=120.0))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]), atol=1e-5)
    toward = Feedback().transform(red, FeedbackTransform(hue=40.0))[0, :, 0, 0]
    assert toward[1] > -1.0 and toward[0] < 1.0 and toward[2] <= -1.0 + 1e-5  # on its way to green
    grey = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(Feedback().transform(grey, FeedbackTransform(hue=77.0)), grey, atol=1e-6)


def test_decay_fades_toward_mid_grey_each_frame():
    picture = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    frames = apply(FeedbackTransform(decay=0.2), picture, 5)
    for step, frame in enumerate(frames, start=1):
        assert torch.allclose(frame, picture * 0.8**step, atol=1e-6)  # toward 0 = mid-grey
    assert float(frames[-1].abs().max()) < float(picture.abs().max())


def test_zooming_out_mirrors_the_picture_at_its_edges_no_black_border():
    assert PADDING_MODE == "reflection"
    bright = torch.full((1, 3, 32, 48), 0.8)
    out = Feedback().transform(bright, FeedbackTransform(zoom=0.5, rotate=20.0, translate=(0.3, -0.2)))
    assert torch.allclose(out, bright, atol=1e-5)  # a zero border would darken the corners


@pytest.mark.parametrize(
    "transform",
    [
        FeedbackTransform(zoom=1.3),
        FeedbackTransform(rotate=-17.0, translate=(0.1, 0.05)),
        FeedbackTransform(zoom=0.7, rotate=44.0, translate=(-0.5, 0.5)),
    ],
)
def test_the_grid_is_affine_grids(transform):
    feedback = Feedback()
    feedback.transform(torch.zeros(1, 3, 24, 40), transform)
    theta = torch.tensor(transform.theta(24, 40), dtype=torch.float32).unsqueeze(0)
    expected = F.affine_grid(theta, [1, 3, 24, 40], align_corners=False)
    assert feedback._buffers is not None
    assert torch.allclose(feedback._buffers.grid, expected, atol=1e-6)


def test_the_colour_matrix_on_the_device_is_rodrigues():
    transform = FeedbackTransform(hue=33.0, decay=0.1)
    picture = torch.rand((1, 3, 4, 4), generator=torch.Generator().manual_seed(2)) * 0.5
    out = Feedback().transform(picture, transform)
    matrix = torch.tensor(transform.colour_matrix())
    assert torch.allclose(out[0].reshape(3, -1), matrix @ picture[0].reshape(3, -1), atol=1e-6)
    assert torch.allclose(matrix @ torch.ones(3), 0.9 * torch.ones(3), atol=1e-6)  # greys stay grey


def test_the_mix_and_its_buffers():
    g = torch.Generator().manual_seed(3)
    image, previous = (torch.rand((1, 3, 16, 24), generator=g) * 2 - 1 for _ in range(2))
    transform = FeedbackTransform(zoom=1.02, rotate=1.0, hue=10.0)
    feedback = Feedback()
    assert feedback.mix(image, previous, 0.0, transform) is image  # no op, bit-identical
    assert feedback._buffers is None  # and nothing made
    expected = 0.4 * image + 0.6 * Feedback().transform(previous, transform)
    mixed = feedback.mix(image, previous, 0.6, transform)
    assert torch.allclose(mixed, expected, atol=1e-6)
    buffers = feedback._buffers
    assert buffers is not None
    grid, pointer = buffers.grid, mixed.data_ptr()
    again = feedback.mix(image, previous, 0.6, transform)
    assert again.data_ptr() == pointer and feedback._buffers is buffers and buffers.grid is grid  # cached
    assert torch.equal(
        feedback.mix(image, previous, 1.0, transform), Feedback().transform(previous, transform)
    )
    identity = FeedbackTransform()
    assert feedback.transform(previous, identity) is previous
    wide = torch.zeros(1, 3, 16, 32)
    feedback.mix(wide, wide, 0.5, transform)
    assert feedback._buffers is not buffers  # another size: made again
    with pytest.raises(ValueError, match="expected the input's"):
        feedback.mix(image, wide, 0.5, transform)


# ----------------------------------------------------------------------------- the pipeline in txt2img


def test_txt2img_takes_the_img2img_path_only_for_a_frame_with_an_image(bundle):
    settings = pipeline_settings(mode=GenerationMode.TXT2IMG, similarity_filter_enabled=True)
    plain, fed = StreamPipeline(bundle, settings), StreamPipeline(bundle, settings)
    first = plain(None)
    assert first is not None and plain.stats.vae_encodes == 0  # as before: from the cached noise
    assert torch.equal(fed(None), first)
    image = torch.zeros(1, 3, SIZE, SIZE)
    for _ in range(3):  # the same picture three times: no similarity skip in txt2img
        out = fed(image)
    assert fed.stats.vae_encodes == 3 and fed.stats.skipped == 0
    assert out is not None and not torch.equal(out, plain(None))
    assert torch.equal(fed(None), plain(None)), "without an image it is txt2img again"


# ----------------------------------------------------------------------------- the engine


class StillSource:
    """The same picture (a fixed random pattern) at 60 fps: which frames the loop drops cannot
    change what it is given, so two engines see the same frames."""

    def __init__(self) -> None:
        rng = np.random.default_rng(5)
        self.pixels = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
        self.sequence = 0

    def recv(self, timeout: float) -> Frame | None:
        time.sleep(1 / 60)
        self.sequence += 1
        return Frame(self.pixels, time.monotonic(), self.sequence)

    def close(self) -> None:
        pass


def _engine(bundle, runtime: dict[str, Any], source=StillSource, **settings: Any) -> Engine:
    pipe = StreamPipeline(bundle, pipeline_settings(**settings))
    options = EngineOptions(stall_seconds=0.0, runtime_values=runtime)
    return Engine(pipe, source, [("rec", RecordingSink)], options)


def _outputs(engine: Engine) -> list[torch.Tensor]:
    """Every tensor the engine hands to the post thread, as it is handed (a copy)."""
    seen: list[torch.Tensor] = []
    emit = engine._emit

    def recording(item: OutputItem) -> None:
        if item.kind is OutputKind.TENSOR:
            seen.append(item.tensor.clone())
        emit(item)

    engine._emit = recording  # type: ignore[method-assign]
    return seen


def _fed(engine: Engine) -> list[bool]:
    """Per pipeline call: whether the feedback changed its input (the input passed on as is: False)."""
    calls: list[bool] = []
    feed_back = engine._feed_back

    def recording(image: torch.Tensor | None) -> torch.Tensor | None:
        result = feed_back(image)
        calls.append(result is not image)
        return result

    engine._feed_back = recording  # type: ignore[method-assign]
    return calls


def test_amount_0_gives_bit_identical_outputs_to_an_engine_without_feedback(bundle):
    transform = {"feedback_zoom": 1.1, "feedback_rotate": 5.0, "feedback_hue": 40.0, "feedback_decay": 0.3}
    variants = {
        "without": _engine(bundle, {}),
        "amount 0": _engine(bundle, {"feedback_amount": 0.0, **transform}),
        "amount 0.5": _engine(bundle, {"feedback_amount": 0.5, **transform}),
    }
    outputs = {name: _outputs(engine) for name, engine in variants.items()}
    fed = {name: _fed(engine) for name, engine in variants.items()}
    for engine in variants.values():
        with engine:
            engine.run(max_frames=6)
    count = min(len(frames) for frames in outputs.values())
    assert count >= 5
    for a, b in zip(outputs["without"][:count], outputs["amount 0"][:count]):
        assert torch.equal(a, b)
    assert not any(fed["amount 0"]) and not any(fed["without"])  # the input itself every frame
    assert fed["amount 0.5"][0] is False and all(fed["amount 0.5"][1:])  # no previous output at first
    assert not torch.equal(outputs["amount 0.5"][count - 1], outputs["without"][count - 1])


def test_txt2img_with_feedback_runs_frames_through_the_engine(bundle):
    runtime = {"feedback_amount": 0.6, "feedback_zoom": 1.02}
    fed_engine = _engine(bundle, runtime, FakeSource, mode=GenerationMode.TXT2IMG)
    plain_engine = _engine(bundle, {}, FakeSource, mode=GenerationMode.TXT2IMG)
    outputs, plain = _outputs(fed_engine), _outputs(plain_engine)
    fed = _fed(fed_engine)
    for engine in (fed_engine, plain_engine):
        with engine:
            assert engine.run(max_frames=8) >= 8
    assert len(outputs) >= 8 and all(torch.isfinite(frame).all() for frame in outputs)
    assert fed[0] is False and all(fed[1:]), "from the second frame on it generates from the fed-back picture"
    assert fed_engine.pipeline.stats.vae_encodes == len(fed) - 1  # the img2img path, frame by frame
    assert plain_engine.pipeline.stats.vae_encodes == 0
    assert all(torch.equal(frame, plain[0]) for frame in plain)  # txt2img alone: one still picture
    changes = [float((b - a).abs().mean()) for a, b in itertools.pairwise(outputs)]
    assert max(changes) > 0.0, "the fed-back picture moves the output"


def test_a_bypass_a_pause_or_a_new_size_start_the_loop_again_from_the_input(bundle):
    engine = _engine(bundle, {"feedback_amount": 0.5, "feedback_zoom": 1.05}, FakeSource)
    fed = _fed(engine)
    with engine:
        engine.run(max_frames=4)
        assert fed[0] is False and all(fed[1:])
        for name in ("bypass", "pause"):
            engine.submit({name: True})
            engine.run(max_frames=engine.frames_emitted + 3)
            engine.submit({name: False})
            del fed[:]
            engine.run(max_frames=engine.frames_emitted + 4)
            assert fed and fed[0] is False and all(fed[1:]), name
        del fed[:]
        engine.submit({"resolution": [96, 64]})  # applied before the next frame
        engine.run(max_frames=engine.frames_emitted + 4)
        assert fed and fed[0] is False and all(fed[1:])
    assert (engine.pipeline.width, engine.pipeline.height) == (96, 64)
    buffers = engine.feedback._buffers
    assert buffers is not None and buffers.key[0] == (1, 3, 64, 96)


def test_modulators_move_the_feedback_but_the_base_is_what_is_echoed(bundle):
    modulators = [
        {"target": "feedback_zoom", "shape": "square", "rate": "8hz", "depth": 0.5},
        {"target": "feedback_translate[1]", "shape": "square", "rate": "8hz", "depth": 0.2},
    ]
    engine = _engine(bundle, {"feedback_amount": 0.5, "modulators": modulators}, FakeSource)
    echoed: list[dict[str, Any]] = []
    engine.on_applied = echoed.append
    played: list[FeedbackTransform] = []
    feed_back = engine._feed_back

    def recording(image: torch.Tensor | None) -> torch.Tensor | None:
        played.append(engine._feedback_transform)
        return feed_back(image)

    engine._feed_back = recording  # type: ignore[method-assign]
    with engine:
        engine.run(max_frames=12)
        engine.submit({"feedback_hue": 30.0})  # a base change while modulated
        engine.run(max_frames=24)
        assert {t.zoom for t in played} >= {1.5} and {t.translate[1] for t in played} >= {0.2}
        assert played[-1].hue == 30.0
        engine.submit({"modulators": []})
        engine.run(max_frames=28)
    applied = engine.control.applied()
    assert applied["feedback_zoom"] == 1.0 and applied["feedback_translate"] == [0.0, 0.0]
    assert {"feedback_hue": 30.0} in echoed and not any("feedback_zoom" in e for e in echoed)
    assert engine._feedback_transform == FeedbackTransform(hue=30.0)  # the bases are back


def test_the_feedback_floats_are_modulatable_and_documented():
    names = ("feedback_amount", "feedback_zoom", "feedback_rotate", "feedback_hue", "feedback_decay")
    assert all(params.modulatable(params.REGISTRY[name]) for name in names)
    assert params.modulatable(params.REGISTRY["feedback_translate"])  # its items
    assert not params.modulatable(params.REGISTRY["bpm"])  # a runtime float that is not per frame
    assert set(params.FRAME_PARAMS) == {*names, "feedback_translate"} <= set(params.RUNTIME_PARAMS)
    assert all(
        params.REGISTRY[name].in_scene and params.REGISTRY[name].restored for name in params.FRAME_PARAMS
    )
    from engine.modulation.targets import parse_target

    assert parse_target("feedback_translate[1]").minimum == -0.5
    docs = params.as_markdown()
    for address in ("/feedback/amount", "/feedback/translate", "/engine/mod/feedback_zoom"):
        assert f"`{address}`" in docs


# ----------------------------------------------------------------------------- OSC and config


def _datagram(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return bytes(builder.build().dgram)


@pytest.mark.parametrize(
    ("address", "args", "needle"),
    [
        ("/feedback/amount", (1.5,), "allowed: a number in [0, 1]"),
        ("/feedback/amount", (float("nan"),), "not finite; allowed:"),
        ("/feedback/zoom", (2.5,), "allowed: a number in [0.5, 2]"),
        ("/feedback/rotate", (90.0,), "allowed: a number in [-45, 45]"),
        ("/feedback/hue", (-200.0,), "allowed: a number in [-180, 180]"),
        ("/feedback/decay", (-0.1,), "allowed: a number in [0, 1]"),
        ("/feedback/translate", (0.1, 0.2, 0.3), "3 items given; allowed: exactly 2 numbers in [-0.5, 0.5]"),
        ("/feedback/translate", (0.1, 0.75), "0.75 is out of range; allowed: exactly 2 numbers"),
    ],
)
def test_bad_feedback_values_are_refused_with_what_is_allowed(address, args, needle):
    defaults = {n: s.default for n, s in params.REGISTRY.items() if s.kind is not params.ParamKind.ACTION}
    state = ControlState(applied=dict(defaults))
    dispatcher = OscDispatcher(state, state.applied, lambda *a, **k: None)
    replies = dispatcher.handle_datagram(_datagram(address, *args), ("127.0.0.1", 50000))
    assert len(replies) == 1 and replies[0].address == "/engine/error"
    assert needle in replies[0].args[0]
    assert state.take_pending() is None and state.applied() == defaults


def test_the_config_section_starts_the_engine_with_its_values(bundle):
    from engine.config import config_from_dict
    from engine.runtime.engine import runtime_values

    config = config_from_dict({"feedback": {"amount": 0.4, "zoom": 1.02, "translate": [0.01, 0], "hue": 3}})
    values = runtime_values(config)
    assert {k: v for k, v in values.items() if k.startswith("feedback")} == {
        "feedback_amount": 0.4,
        "feedback_zoom": 1.02,
        "feedback_rotate": 0.0,
        "feedback_translate": [0.01, 0],
        "feedback_hue": 3,
        "feedback_decay": 0.0,
    }
    engine = _engine(bundle, values)
    with engine:
        assert engine._feedback_amount == 0.4
        assert engine._feedback_transform == FeedbackTransform(1.02, 0.0, (0.01, 0.0), 3.0, 0.0)
        assert engine.control.applied()["feedback_translate"] == [0.01, 0.0]
