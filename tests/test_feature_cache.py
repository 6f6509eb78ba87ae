"""The feature cache of past frames: off is today exactly, on a past frame steers, explicit graph IO."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.params import ParamError
from engine.pipeline import StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.feature_bank import EMPTY_BIAS, FeatureCache, feature_layout, slot_bias
from engine.stream.modes import CfgType
from tests.fakes import SIZE, pipeline_settings


@pytest.fixture
def own(bundle):
    """``bundle`` on its own copy of the UNet: the cache puts its processors on the UNet."""
    return dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet))


def settings(**overrides):
    values = {"t_index_list": [20, 35], "cfg_type": CfgType.SELF, **overrides}
    return pipeline_settings(**values)


def image(seed: int) -> torch.Tensor:
    return torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(pipe: StreamPipeline, frames) -> list[torch.Tensor]:
    return [out.clone() for out in (pipe(f) for f in frames) if out is not None]


def bank_of(pipe: StreamPipeline):
    """The pipeline's feature cache (None while it is off)."""
    return pipe.extensions["feature_cache"].cache


def drifting(count: int) -> list[torch.Tensor]:
    return [torch.roll(image(0), shifts=2 * k, dims=3) for k in range(count)]


# ---------------------------------------------------------------- the math
def test_layout_counts_every_self_attention_layer(bundle):
    layout = feature_layout(bundle.unet, 8, 8)
    names = [n for n in bundle.unet.attn_processors if n.endswith("attn1.processor")]
    assert layout.names == tuple(names)
    # builtin:tiny: 32 channels at 8x8 in the down/up blocks, 64 at 4x4 in the mid block
    assert sorted(set(layout.shapes)) == [(16, 64), (64, 32)]
    assert layout.total == sum(t * c for t, c in layout.shapes)
    parts = layout.split(torch.arange(2 * layout.total, dtype=torch.float32).view(2, -1))
    assert [tuple(p.shape) for p in parts] == [(2, *shape) for shape in layout.shapes]


def test_slot_bias_and_the_ring_fill_every_interval():
    assert slot_bias([True, False], 1.0) == [0.0, EMPTY_BIAS]
    assert slot_bias([True, True], 0.0) == [EMPTY_BIAS, EMPTY_BIAS]
    cache = FeatureCache(2, 1, 3, torch.device("cpu"), torch.float32)
    cache.configure(interval=2, strength=0.5, injection=0.0, threshold=0.9)
    for value in range(5):  # calls 0, 2, 4 are kept: slots 0, 1, then 0 again
        cache.push(torch.full((1, 3), float(value)))
    assert cache.pushes == 3 and cache.filled == [True, True]
    assert cache.bank[:, 0, 0].tolist() == [4.0, 2.0]
    assert torch.allclose(cache.bias, torch.log(torch.tensor([0.5, 0.5])))
    cache.reset()
    assert cache.filled == [False, False] and cache.bias.tolist() == [EMPTY_BIAS] * 2


# ---------------------------------------------------------------- the pipeline
def test_off_is_todays_output_exactly_also_after_switching_it_on_and_off(bundle, own):
    frames = drifting(8)
    plain = run(StreamPipeline(bundle, settings()), frames)
    pipe = StreamPipeline(own, settings())
    before = {name: type(p) for name, p in own.unet.attn_processors.items()}
    assert all(torch.equal(a, b) for a, b in zip(plain, run(pipe, frames)))
    apply_change(pipe, {"feature_cache_enabled": True})
    run(pipe, frames[:3])
    apply_change(pipe, {"feature_cache_enabled": False})
    assert {name: type(p) for name, p in own.unet.attn_processors.items()} == before, "processors restored"
    again = run(pipe, frames)  # warm: an output for every frame; plain's first is frame 1's
    assert len(again) == len(plain) + 1
    assert all(torch.equal(a, b) for a, b in zip(plain, again[1:])), "once the stream batch turned over"


def test_a_past_frame_changes_the_current_output(own):
    """n = 1: without the cache an output depends on its own input frame alone."""
    current = image(3)

    def last(enabled: bool, previous: torch.Tensor) -> torch.Tensor:
        pipe = StreamPipeline(own, settings(t_index_list=[32], feature_cache_enabled=enabled))
        return run(pipe, [previous, current])[-1]

    assert torch.equal(last(False, image(1)), last(False, image(2)))
    a, b = last(True, image(1)), last(True, image(2))
    assert (a - b).abs().max() > 1e-4, "the cached features of another past frame steer the picture"
    apply_change(StreamPipeline(own, settings()), {})  # (the UNet keeps working for plain pipelines)


def test_strength_zero_is_off_and_injection_changes_the_picture(bundle, own):
    frames = drifting(5)
    plain = run(StreamPipeline(bundle, settings()), frames)
    zero = run(StreamPipeline(own, settings(feature_cache_enabled=True, feature_cache_strength=0.0)), frames)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, zero))
    full = run(StreamPipeline(own, settings(feature_cache_enabled=True)), frames)
    injected = run(
        StreamPipeline(
            own,
            settings(feature_cache_enabled=True, feature_cache_injection=1.0, feature_cache_threshold=0.0),
        ),
        frames,
    )
    assert not torch.allclose(full[-1], plain[-1], atol=1e-5)
    assert not torch.allclose(injected[-1], full[-1], atol=1e-5)


def test_the_cache_resets_on_prompt_seed_and_size_and_takes_live_settings(own):
    pipe = StreamPipeline(own, settings(feature_cache_enabled=True, feature_cache_frames=3))
    run(pipe, drifting(4))
    cache = bank_of(pipe)
    assert cache is not None and cache.filled == [True, True, True]
    for change in ({"prompt": "another picture"}, {"seed": 9}):
        run(pipe, drifting(2))
        apply_change(pipe, change)
        assert bank_of(pipe) is cache and cache.filled == [False, False, False], change
    apply_change(pipe, {"feature_cache_interval": 4, "feature_cache_strength": 0.5})
    assert bank_of(pipe) is cache and cache.interval == 4
    apply_change(pipe, {"resolution": [96, 64]})
    assert (
        bank_of(pipe) is not cache
        and bank_of(pipe).bank.shape[-1] == pipe.unet_shape().feature_size
    )
    assert bank_of(pipe).filled == [False] * 3
    apply_change(pipe, {"t_index_list": [10, 20, 30]})
    assert bank_of(pipe).bank.shape[:2] == (3, 3)
    out = pipe(torch.rand((1, 3, 64, 96)) * 2 - 1)
    assert out is None or out.shape == (1, 3, 64, 96)


def test_bad_values_are_refused_and_change_nothing(own):
    pipe = StreamPipeline(own, settings(feature_cache_enabled=True))
    for change, words in (
        ({"feature_cache_frames": 0}, "feature_cache_frames"),
        ({"feature_cache_frames": 9}, "1, 4"),
        ({"feature_cache_strength": 1.5}, "1.5"),
        ({"feature_cache_interval": 0}, "feature_cache_interval"),
    ):
        with pytest.raises(ParamError, match=words):
            apply_change(pipe, change)
    assert pipe.state["feature_cache_frames"] == 2 and pipe.state["feature_cache_strength"] == 1.0


def test_switching_it_on_needs_new_engines_on_static_backends(own):
    pipe = StreamPipeline(own, settings())
    target = pipe.target_for({"feature_cache_enabled": True})
    assert target is not None and target.unet.feature_frames == 2 and target.vae is None
    assert pipe.target_for({"feature_cache_strength": 0.3}) is None


def test_with_cross_frame_attention_and_full_cfg(own):
    pipe = StreamPipeline(
        own,
        settings(
            cross_frame_attention=True, cfg_type=CfgType.FULL, guidance_scale=1.5, feature_cache_enabled=True
        ),
    )
    outputs = run(pipe, drifting(4))
    assert len(outputs) == 3 and all(torch.isfinite(o).all() for o in outputs)
    assert bank_of(pipe) is not None and bank_of(pipe).bank.shape[1] == 4


def test_sdxl_with_the_cache():
    from engine.models.loader import ModelRequest, load_models

    sdxl = load_models(ModelRequest(id="builtin:tiny-sdxl", device="cpu", dtype="float32"))
    plain = run(StreamPipeline(sdxl, settings()), drifting(4))
    cached = run(StreamPipeline(sdxl, settings(feature_cache_enabled=True)), drifting(4))
    assert not torch.allclose(plain[-1], cached[-1], atol=1e-5)


# ---------------------------------------------------------------- explicit graph IO
def test_the_onnx_graph_takes_the_bank_and_gives_the_features(own, tmp_path):
    pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])"
    )
    from engine.accel.onnx_export import export_unet
    from engine.accel.onnxruntime_backend import OrtUNet
    from engine.accel.torch_backend import TorchUNet
    from engine.extensions.feature_cache import FEATURE_INPUTS

    pipe = StreamPipeline(
        own, settings(feature_cache_enabled=True, feature_cache_injection=0.5, feature_cache_threshold=0.0)
    )
    run(pipe, drifting(3))
    shape = pipe.unet_shape()
    assert set(FEATURE_INPUTS) <= set(shape.io.inputs) and list(shape.io.outputs) == [
        "prediction",
        "features",
    ]
    ort = OrtUNet(export_unet(own.unet, shape, tmp_path / "unet.onnx"), shape)
    latents, timesteps, embeddings = pipe.unet_inputs()
    got, want = pipe.conditioning(), pipe.conditioning()
    ours = ort(latents, timesteps, embeddings, got)
    theirs = TorchUNet.of(own)(latents, timesteps, embeddings, want)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert got is not None and want is not None
    assert got.outputs["features"] and want.outputs["features"]
    assert torch.allclose(got.outputs["features"][0], want.outputs["features"][0], atol=1e-4)
    with pytest.raises(ValueError, match="feature_bank"):
        ort(latents, timesteps, embeddings)


def test_the_pipeline_on_onnxruntime_with_the_cache_matches_torch(bundle, own, tmp_path):
    pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])"
    )
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape
    from engine.runtime.changes import open_pipeline

    on = settings(feature_cache_enabled=True, feature_cache_frames=2)
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    reference_models = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet))
    backend = OnnxRuntimeBackend(own, VaeShape(SIZE, SIZE), accel)
    ort, reference = open_pipeline(own, on, backend), StreamPipeline(reference_models, on)
    for frame in drifting(6):
        expected, actual = reference(frame), ort(frame)
        assert (expected is None) == (actual is None)
        if expected is not None:
            assert float((actual - expected).abs().max()) <= 1e-3
    assert bank_of(ort) is not None and bank_of(ort).pushes == 6
    backend.close()


def test_the_engine_key_and_the_tensorrt_profile_carry_the_cache(own, tmp_path):
    from engine.accel import tensorrt_backend as trtb
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape

    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    backend = OnnxRuntimeBackend(own, VaeShape(SIZE, SIZE), accel)
    pipe = StreamPipeline(own, settings())
    with_cache = {**pipe.state, "feature_cache_enabled": True, "feature_cache_frames": 3}
    plain, cached = pipe.unet_shape(), pipe.unet_shape(state=with_cache)
    assert backend.unet_keys([plain])[0].digest() != backend.unet_keys([cached])[0].digest()
    profile = trtb.static_profile(cached, "unet")
    assert profile["feature_bank"] == ((3, cached.batch, cached.feature_size),) * 3
    assert profile["feature_bias"] == ((3,),) * 3 and profile["feature_injection"] == ((2,),) * 3
