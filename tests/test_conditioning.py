"""ControlNet preprocessors: Canny in torch, depth from a (tiny random) model, the frame itself."""

from __future__ import annotations

import pytest
import torch

from engine.conditioning.canny import CannyDetector
from engine.conditioning.depth import DepthEstimator, build_tiny_depth_model
from engine.conditioning.preprocess import as_condition, make_preprocessor
from engine.models.errors import ModelLoadError
from engine.models.kinds import ControlPreprocessor


def square(size: int = 64) -> torch.Tensor:
    image = -torch.ones((1, 3, size, size))
    image[..., 16:48, 16:48] = 1.0
    return image


def test_canny_finds_the_border_of_a_square_and_nothing_else():
    edges = CannyDetector()(square())
    assert edges.shape == (1, 3, 64, 64) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 1], edges[:, 2])
    ring = torch.zeros((64, 64), dtype=torch.bool)
    ring[13:51, 13:51] = True
    ring[19:45, 19:45] = False
    found = edges[0, 0] > 0
    assert found.sum() >= 4 * 30, "most of the border"
    assert not (found & ~ring).any(), "nothing far inside or outside"


def test_canny_batch_equals_single_calls_and_keeps_dtype():
    detector = CannyDetector()
    other = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    both = detector(torch.cat([square(), other]))
    assert torch.equal(both[:1], detector(square())) and torch.equal(both[1:], detector(other))
    assert detector(square().to(torch.bfloat16)).dtype == torch.bfloat16


def test_canny_thresholds_above_every_gradient_give_no_edges():
    assert CannyDetector(0.98, 0.99)(square() * 0.01).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"low_threshold": 0.3, "high_threshold": 0.2}, "low=0.3, high=0.2; allowed: 0 <= low < high <= 1"),
        ({"low_threshold": -0.1}, "allowed: 0 <= low"),
        ({"high_threshold": 1.5}, "high=1.5"),
        ({"sigma": 0.0}, "sigma 0.0"),
        ({"hysteresis_steps": -1}, "hysteresis_steps -1"),
    ],
)
def test_canny_refuses_bad_settings_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        CannyDetector(**kwargs)


def test_the_tiny_depth_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_depth_model(3), build_tiny_depth_model(3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_depth_maps_are_normalized_per_image_at_the_frame_size():
    estimator = DepthEstimator.load("builtin:tiny-depth", "cpu", torch.float32)
    frames = torch.rand((2, 3, 64, 96), generator=torch.Generator().manual_seed(1)) * 2 - 1
    depth = estimator(frames)
    assert depth.shape == (2, 3, 64, 96) and not depth.isnan().any()
    assert torch.allclose(depth.amin(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(depth.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert torch.equal(depth[:, 0], depth[:, 2])
    assert not torch.equal(depth[0], depth[1]), "another picture, another map"


@pytest.mark.parametrize(
    ("model_id", "words"),
    [
        ("builtin:huge-depth", "unknown builtin depth model"),
        ("./no/such/depth", "not a folder nor a hub id"),
        ("nobody/no-such-depth", "could not be loaded"),
    ],
)
def test_depth_load_errors_name_the_model(model_id, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        DepthEstimator.load(model_id, "cpu", torch.float32)
    assert model_id in str(caught.value)


def test_the_factory_gives_each_preprocessor():
    options = {
        "low_threshold": 0.1,
        "high_threshold": 0.2,
        "device": torch.device("cpu"),
        "dtype": torch.float32,
    }
    assert make_preprocessor(ControlPreprocessor.NONE, depth_id="-", **options) is as_condition
    assert isinstance(make_preprocessor(ControlPreprocessor.CANNY, depth_id="-", **options), CannyDetector)
    depth = make_preprocessor(ControlPreprocessor.DEPTH, depth_id="builtin:tiny-depth", **options)
    assert isinstance(depth, DepthEstimator)
    frame = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)
    assert torch.allclose(as_condition(frame), (frame + 1) / 2)
