"""ControlNets in the exported UNet graph: the scales are graph inputs, the output equals torch's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install latentstage[onnx])")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])")

from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
from engine.accel.base import Conditioning, VaeShape
from engine.accel.onnx_export import export_unet
from engine.accel.onnxruntime_backend import OrtUNet
from engine.accel.torch_backend import TorchUNet
from engine.extensions.controlnet import CONTROL_INPUTS, ControlNetPart, control_images_shape
from engine.models.controlnet import build_random_controlnet
from engine.pipeline import ControlNetSettings, StreamPipeline
from engine.runtime.changes import apply_change, open_pipeline
from engine.stream.modes import CfgType
from tests.fakes import SIZE, pipeline_settings


@pytest.fixture(scope="module")
def controlled(bundle):
    nets = [build_random_controlnet(bundle.unet, seed=s) for s in (0, 1)]
    return dataclasses.replace(bundle, controlnets=nets, identity=dict(bundle.identity))


def settings():
    controls = (ControlNetSettings(scale=0.7), ControlNetSettings(scale=0.4))
    return pipeline_settings(t_index_list=[20, 35], cfg_type=CfgType.SELF, controlnets=controls)


def inputs(shape):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(shape.latents, generator=g),
        torch.tensor([700, 400][: shape.batch]),
        torch.randn(shape.embeddings, generator=g),
        torch.rand(control_images_shape(shape), generator=g),
    )


def test_the_scales_are_graph_inputs_and_the_graph_equals_torch(controlled, tmp_path):
    pipe = StreamPipeline(controlled, settings())
    shape = pipe.unet_shape()
    assert shape.controlnets == 2 and set(CONTROL_INPUTS) <= set(shape.io.inputs)
    parts = [ControlNetPart(controlled.controlnets)]
    path = export_unet(controlled.unet, shape, tmp_path / "unet.onnx", parts=parts)
    ort, torch_runner = OrtUNet(path, shape), TorchUNet(controlled.unet, parts=parts)
    latents, timesteps, embeddings, images = inputs(shape)
    results = {}
    for scales in ([[1.0, 1.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]):
        conditioning = Conditioning({"control_images": images, "control_scales": torch.tensor(scales)})
        got = ort(latents, timesteps, embeddings, conditioning)
        want = torch_runner(latents, timesteps, embeddings, conditioning)
        assert torch.allclose(got, want, atol=1e-4), f"ORT equals torch at scales {scales}"
        results[str(scales)] = got
    first, off, mixed = results.values()
    assert not torch.allclose(first, off, atol=1e-3) and not torch.allclose(first, mixed, atol=1e-3)
    plain = TorchUNet(controlled.unet)(latents, timesteps, embeddings)
    assert torch.allclose(off, plain, atol=1e-4), "scale 0 in the graph adds nothing"


def test_the_graph_refuses_a_call_without_its_control_inputs(controlled, tmp_path):
    shape = StreamPipeline(controlled, settings()).unet_shape()
    parts = [ControlNetPart(controlled.controlnets)]
    path = export_unet(controlled.unet, shape, tmp_path / "unet.onnx", parts=parts)
    latents, timesteps, embeddings, _ = inputs(shape)
    with pytest.raises(ValueError, match="control_images and control_scales"):
        OrtUNet(path, shape)(latents, timesteps, embeddings)


def test_export_refuses_a_shape_for_other_controlnets(controlled, tmp_path):
    shape = StreamPipeline(controlled, settings()).unet_shape()
    with pytest.raises(ValueError, match="2 ControlNet"):
        parts = [ControlNetPart(controlled.controlnets[:1])]
        export_unet(controlled.unet, shape, tmp_path / "u.onnx", parts=parts)


def test_a_live_scale_change_on_onnxruntime_reuses_the_graph(controlled, tmp_path):
    """/controlnet_scales on the ORT backend: no re-export, no new runner, another output."""
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    backend = OnnxRuntimeBackend(controlled, VaeShape(SIZE, SIZE), accel)
    pipe = open_pipeline(controlled, settings(), backend)
    runner = pipe.runners.unet
    assert isinstance(runner, OrtUNet)
    frame = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(4)) * 2 - 1
    for _ in range(3):
        before = pipe(frame)
    apply_change(pipe, {"controlnet_scales": [0.0, 0.0]}, backend)
    assert pipe.runners.unet is runner
    exported = sorted(p.name for p in tmp_path.rglob("*.onnx"))
    for _ in range(3):
        after = pipe(frame)
    assert sorted(p.name for p in tmp_path.rglob("*.onnx")) == exported, "nothing was exported again"
    assert before is not None and after is not None and not torch.allclose(before, after, atol=1e-3)
    backend.close()
