"""ControlNet preprocessors: Canny in torch, depth from a (tiny random) model, the frame itself."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.conditioning import CannyDetector, DepthEstimator, build_tiny_depth_model
from engine.conditioning.preprocess import as_condition, make_preprocessor
from engine.models.errors import ModelLoadError
from engine.models.kinds import ControlPreprocessor

SIZE = 64


def square(contrast: float = 1.0) -> torch.Tensor:
    """``(1, 3, 64, 64)`` in [-1, 1]: a square over rows/columns 16..47, ``contrast`` brighter than its
    surround (1.0: white on black), centred on mid-gray otherwise."""
    image = torch.full((1, 3, SIZE, SIZE), -contrast)
    image[..., 16:48, 16:48] = contrast
    return image


def noise(seed: int, shape: tuple[int, ...] = (1, 3, SIZE, SIZE)) -> torch.Tensor:
    """Uniform noise in [-1, 1] from a local generator."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- Canny
def test_canny_finds_the_border_of_a_square_and_nothing_else():
    edges = CannyDetector()(square())
    assert edges.shape == (1, 3, SIZE, SIZE) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 1], edges[:, 2])
    border = torch.zeros((SIZE, SIZE), dtype=torch.bool)
    border[13:51, 13:51] = True
    border[19:45, 19:45] = False
    found = edges[0, 0] > 0
    assert found.sum() >= 4 * 30, "most of the border"
    assert not (found & ~border).any(), "nothing far inside or outside"
    assert found[10:24, 32].sum() == 1 and found[32, 10:24].sum() == 1, "one pixel wide"


def test_canny_batch_equals_single_calls():
    detector = CannyDetector()
    both = detector(torch.cat([square(), noise(0)]))
    assert torch.equal(both[:1], detector(square())) and torch.equal(both[1:], detector(noise(0)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_canny_half_precision_frames_give_the_float32_edges_in_their_dtype(dtype):
    frame = square().to(dtype)
    try:
        edges = CannyDetector()(frame)
    except RuntimeError as err:  # an op without a CPU kernel for this dtype in this torch build
        pytest.skip(f"{dtype} Canny is not supported on this CPU torch build: {err}")
    assert edges.dtype == dtype and edges.shape == frame.shape
    assert torch.equal(edges.float(), CannyDetector()(frame.float()))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"low_threshold": 0.3, "high_threshold": 0.2}, "low=0.3, high=0.2; allowed: 0 <= low < high <= 1"),
        ({"low_threshold": 0.2, "high_threshold": 0.2}, "low=0.2, high=0.2; allowed: 0 <= low < high <= 1"),
        ({"low_threshold": -0.1}, "low=-0.1, high=0.2; allowed: 0 <= low"),
        ({"high_threshold": 1.5}, "high=1.5; allowed: 0 <= low < high <= 1"),
        ({"sigma": 0.0}, "sigma 0.0; allowed: a number > 0"),
        ({"hysteresis_steps": -1}, "hysteresis_steps -1; allowed: an integer >= 0"),
    ],
)
def test_canny_refuses_bad_settings_naming_the_value_and_the_range(kwargs, words):
    with pytest.raises(ValueError, match=words):
        CannyDetector(**kwargs)


def test_canny_refuses_frames_that_are_not_n_3_h_w():
    with pytest.raises(ValueError, match=r"shape \(1, 1, 64, 64\).*allowed: a floating \(N, 3, H, W\)"):
        CannyDetector()(torch.zeros((1, 1, SIZE, SIZE)))
    with pytest.raises(ValueError, match=r"size \(2, 64\); allowed: height and width >= 3"):
        CannyDetector()(torch.zeros((1, 3, 2, SIZE)))


def test_canny_high_threshold_above_the_strongest_gradient_gives_no_edges():
    # a gray step of 0.08 has a blurred Sobel magnitude of about 2.2 * 0.08 = 0.17
    faint = square(contrast=0.08)
    assert CannyDetector(0.05, 0.1)(faint).sum() > 0
    assert CannyDetector(0.0, 0.2)(faint).sum() == 0
    assert CannyDetector()(torch.zeros((1, 3, SIZE, SIZE))).sum() == 0, "a flat frame has no edges"


def test_hysteresis_follows_weak_edges_from_strong_ones_for_its_step_count():
    # one horizontal edge at rows 31/32, below it a gray fading from 0.3 (strong) to 0.07 (weak:
    # magnitude about 0.15) too gently for edges of its own; strong for the first 38 columns
    gray = torch.zeros((SIZE, SIZE))
    gray[32:] = torch.cat([torch.full((8,), 0.3), torch.linspace(0.3, 0.07, 33), torch.full((23,), 0.07)])
    frame = (gray * 2 - 1).expand(1, 3, SIZE, SIZE)

    def edge_columns(steps: int) -> torch.Tensor:
        edges = CannyDetector(0.1, 0.2, hysteresis_steps=steps)(frame)[0, 0]
        assert edges[:28].sum() == 0 and edges[36:].sum() == 0, "only the one edge"
        return edges[28:36].amax(dim=0)

    assert edge_columns(0).sum() == 38, "strong pixels only"
    assert edge_columns(12).sum() == 38 + 12, "one pixel further along the weak edge per step"
    assert edge_columns(SIZE).all(), "all of a weak edge 8-connected to a strong one"


def test_canny_weak_edges_without_a_strong_neighbour_stay_off():
    assert CannyDetector(0.1, 0.2, hysteresis_steps=SIZE)(square(contrast=0.07)).sum() == 0


# ---------------------------------------------------------------- depth
class FlatDepth(torch.nn.Module):
    """A stand-in depth model: records its input and predicts the same depth everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.level = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.seen.append(pixel_values.clone())
        batch, _, height, width = pixel_values.shape
        return SimpleNamespace(predicted_depth=self.level.expand(batch, height // 2, width // 2))


def test_the_tiny_depth_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = build_tiny_depth_model(3), build_tiny_depth_model(3), build_tiny_depth_model(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    pairs = list(zip(first.state_dict().values(), again.state_dict().values()))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)
    assert not all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values())
    )
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_depth_maps_are_normalized_per_image_at_the_frame_size():
    estimator = DepthEstimator.load("builtin:tiny-depth", "cpu", torch.float32)
    depth = estimator(noise(1, (2, 3, 64, 96)))
    assert depth.shape == (2, 3, 64, 96) and depth.dtype == torch.float32
    assert not depth.isnan().any() and depth.min() >= 0 and depth.max() <= 1
    assert torch.allclose(depth.amin(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(depth.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert torch.equal(depth[:, 0], depth[:, 1]) and torch.equal(depth[:, 1], depth[:, 2])
    assert not torch.equal(depth[0], depth[1]), "another picture, another map"


def test_depth_input_is_resized_to_the_patch_grid_and_imagenet_normalized():
    model = FlatDepth()
    estimator = DepthEstimator(model, input_size=60, patch=14)
    assert estimator.input_size == 56
    estimator(torch.full((2, 3, 40, 30), -1.0))  # black: 0 in [0, 1]
    (pixels,) = model.seen
    assert pixels.shape == (2, 3, 56, 56)
    expected = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(pixels[0, :, 0, 0], expected, atol=1e-5)


def test_a_flat_depth_map_gives_zeros_not_nan():
    depth = DepthEstimator(FlatDepth(), input_size=28)(torch.zeros((1, 3, 32, 48)))
    assert depth.shape == (1, 3, 32, 48) and not depth.isnan().any() and depth.abs().max() == 0


def test_a_constant_frame_through_the_tiny_model_gives_a_finite_map():
    estimator = DepthEstimator.load("builtin:tiny-depth", "cpu", torch.float32)
    depth = estimator(torch.zeros((1, 3, 32, 32)))
    assert depth.isfinite().all() and depth.min() >= 0 and depth.max() <= 1


def test_depth_keeps_the_frame_dtype():
    estimator = DepthEstimator.load("builtin:tiny-depth", "cpu", torch.float32)
    assert estimator(noise(2).to(torch.bfloat16)).dtype == torch.bfloat16


def test_depth_loads_a_local_folder_in_the_asked_dtype(tmp_path):
    build_tiny_depth_model(5).save_pretrained(tmp_path)
    estimator = DepthEstimator.load(str(tmp_path), "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in estimator.model.parameters())
    expected = build_tiny_depth_model(5).to(torch.bfloat16).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in estimator.model.state_dict().items())


@pytest.mark.parametrize(
    ("model_id", "words"),
    [
        ("builtin:huge-depth", "unknown builtin depth model"),
        ("./no/such/depth", "is not an existing folder, nor a hub id of the form org/name"),
        ("nobody/no-such-depth", "is not a local folder and could not be fetched from the hub"),
    ],
)
def test_depth_load_errors_name_the_model_and_what_is_accepted(model_id, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        DepthEstimator.load(model_id, "cpu", torch.float32)
    assert repr(model_id) in str(caught.value) and "builtin:tiny-depth" in str(caught.value)


def test_a_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "depth-anything-small"
    with pytest.raises(ModelLoadError, match="is not an existing folder") as caught:
        DepthEstimator.load(str(missing), "cpu", torch.float32)
    assert str(missing) in str(caught.value)


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(
        ModelLoadError, match="could not be loaded as a transformers depth-estimation"
    ) as caught:
        DepthEstimator.load(str(tmp_path), "cpu", torch.float32)
    assert str(tmp_path) in str(caught.value)


# ---------------------------------------------------------------- the factory
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
