"""The extension protocol: an extension defined only here runs on torch and ONNX Runtime alike."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch
from pydantic import BaseModel, Field

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.extensions import register, registered, unregister
from engine.extensions.base import NO_IO, Change, Extension, FrameInputs, GraphPart, UNetCall
from engine.params import ParamError
from engine.pipeline import StreamPipeline
from engine.stream.modes import CfgType
from tests.fakes import SIZE, pipeline_settings

# ------------------------------------------------------------------ the extension, this file only
BIAS = "slot_bias"


class SlotBiasPart(GraphPart):
    """Adds ``slot_bias (B,)`` to each batch row of the UNet's prediction."""

    inputs = (BIAS,)

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        call.notes[BIAS] = tensors[0]

    def after(self, call: UNetCall) -> list[torch.Tensor]:
        assert call.prediction is not None
        call.prediction = call.prediction + call.notes[BIAS].to(call.prediction.dtype).view(-1, 1, 1, 1)
        return []


class SlotBiasSettings(BaseModel):
    """``extensions.slot_bias`` in config.yaml."""

    per_slot: list[float] = Field(min_length=1, max_length=8)


class SlotBias(Extension):
    """A per-slot additive bias on the UNet output: the oldest slot (finishing now) gets the last."""

    name = BIAS
    inputs = (BIAS,)
    config_model = SlotBiasSettings

    def __init__(self, per_slot: list[float], device: torch.device, dtype: torch.dtype) -> None:
        self.per_slot = per_slot
        self.device, self.dtype = device, dtype
        self.bias = torch.zeros(0)
        self.commits = 0

    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        return GraphIO({BIAS: (shape.batch,)}, {}) if shape.option(BIAS) else NO_IO

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: Any) -> GraphPart | None:
        return SlotBiasPart() if shape is None or shape.option(BIAS) else None

    @classmethod
    def create(cls, pipeline: StreamPipeline) -> SlotBias | None:
        options = pipeline.settings.extensions.get(BIAS)
        if options is None:
            return None
        settings = SlotBiasSettings.model_validate(options)
        made = cls(settings.per_slot, pipeline.device, pipeline.dtype)
        made.bias = made.rows(pipeline.batch.n, pipeline.batch.cfg_type)
        return made

    def rows(self, n: int, cfg_type: CfgType) -> torch.Tensor:
        """``(B,)``: slot k's bias on every row of slot k (the unconditional rows of full CFG too)."""
        from engine.stream.guidance import unet_batch_size

        slots = torch.tensor([self.per_slot[k % len(self.per_slot)] for k in range(n)])
        batch = unet_batch_size(cfg_type, n)
        return slots.repeat(batch // n + 1)[-batch:].to(self.device, self.dtype)

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        return {"options": ((BIAS, len(self.per_slot)),)}

    def plan(self, change: Change) -> torch.Tensor:
        return self.rows(change.n, change.cfg_type)

    def commit(self, plan: torch.Tensor, change: Change) -> None:
        self.bias = plan
        self.commits += 1

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        conditioning.inputs[BIAS] = self.bias


@pytest.fixture
def slot_bias() -> Iterator[type[SlotBias]]:
    register(SlotBias)
    try:
        yield SlotBias
    finally:
        unregister(SlotBias)


def settings(**overrides: Any):
    values = {"t_index_list": [20, 35], "cfg_type": CfgType.SELF, **overrides}
    return pipeline_settings(**values)


def frames(count: int) -> list[torch.Tensor]:
    image = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return [torch.roll(image, shifts=2 * k, dims=3) for k in range(count)]


def run(pipe: StreamPipeline, count: int = 5) -> list[torch.Tensor]:
    return [out.clone() for out in (pipe(f) for f in frames(count)) if out is not None]


ON = {BIAS: {"per_slot": [0.0, 0.4]}}


# ------------------------------------------------------------------ the tests
def test_registration_is_ordered_and_names_are_unique(slot_bias):
    names = [kind.name for kind in registered()]
    assert names == ["sdxl", "controlnet", "ip_adapter", "cross_frame", "feature_cache", BIAS]

    class Twin(Extension):
        name = BIAS

    with pytest.raises(ValueError, match="slot_bias"):
        register(Twin)


def test_the_extension_changes_the_torch_call_and_the_shape(bundle, slot_bias):
    plain = StreamPipeline(bundle, settings())
    biased = StreamPipeline(bundle, settings(extensions=ON))
    assert "slot_bias" in biased.extensions and "slot_bias" not in plain.extensions
    shape = biased.unet_shape()
    assert shape.option(BIAS) == 2 and list(shape.io.inputs)[-1] == BIAS
    assert shape.io.inputs[BIAS] == (shape.batch,) and BIAS not in plain.unet_shape().io.inputs
    assert shape != plain.unet_shape(), "another graph: another shape, another engine"
    ours, theirs = run(biased), run(plain)
    assert len(ours) == len(theirs) == 4
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, theirs)), "the bias reaches the picture"
    zero = StreamPipeline(bundle, settings(extensions={BIAS: {"per_slot": [0.0]}}))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(run(zero), theirs)), "bias 0 is the plain call"


def test_the_extension_follows_a_live_change(bundle, slot_bias):
    from engine.runtime.changes import apply_change

    pipe = StreamPipeline(bundle, settings(extensions=ON))
    extension = pipe.extensions[BIAS]
    assert isinstance(extension, SlotBias) and tuple(extension.bias.shape) == (2,)
    apply_change(pipe, {"cfg_type": "full"})
    assert extension.commits == 1 and tuple(extension.bias.shape) == (4,) == (pipe.unet_batch_size,)
    assert len(run(pipe)) == 4


def test_the_extension_runs_on_onnxruntime_as_on_torch(bundle, slot_bias, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install ...[onnx])")
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape
    from engine.accel.onnxruntime_backend import OrtUNet
    from engine.runtime.changes import open_pipeline

    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    backend = OnnxRuntimeBackend(bundle, VaeShape(SIZE, SIZE), accel)
    try:
        ort = open_pipeline(bundle, settings(extensions=ON), backend)
        assert isinstance(ort.runners.unet, OrtUNet) and BIAS in ort.runners.unet.graph.input_names
        plain_key = backend.unet_keys([StreamPipeline(bundle, settings()).unet_shape()])[0]
        assert backend.unet_keys([ort.unet_shape()])[0].digest() != plain_key.digest()
        reference = StreamPipeline(bundle, settings(extensions=ON))
        expected, actual = run(reference), run(ort)
        assert len(expected) == len(actual) == 4
        for want, got in zip(expected, actual):
            assert float((got - want).abs().max()) <= 1e-3, "ONNX Runtime equals torch"
        latents, timesteps, embeddings = ort.unet_inputs()
        with pytest.raises(ValueError, match="slot_bias"):
            ort.runners.unet(latents, timesteps, embeddings)
    finally:
        backend.close()


def test_config_names_a_registered_extension_and_validates_its_settings(slot_bias):
    from engine.config.errors import ConfigError
    from engine.config.files import config_from_dict
    from engine.pipeline import PipelineSettings

    config = config_from_dict({"extensions": {BIAS: {"per_slot": [0.1, 0.2]}}})
    assert PipelineSettings.from_config(config).extensions == {BIAS: {"per_slot": [0.1, 0.2]}}
    with pytest.raises(ConfigError, match=r"extensions\.nothing: 'nothing' is not a registered .*slot_bias"):
        config_from_dict({"extensions": {"nothing": {}}})
    refused = r"extensions\.slot_bias\.per_slot: \[\] is refused .*SlotBiasSettings"
    with pytest.raises(ConfigError, match=refused):
        config_from_dict({"extensions": {BIAS: {"per_slot": []}}})


def test_an_absent_builtin_refuses_its_parameters_and_keeps_the_state(bundle):
    pipe = StreamPipeline(bundle, settings())
    before = dict(pipe.state)
    assert "controlnet" not in pipe.extensions and pipe.state["controlnet_scales"] is None
    with pytest.raises(ParamError, match=r"no model\.controlnets are configured"):
        pipe.plan({"controlnet_scales": [1.0]})
    with pytest.raises(ParamError, match=r"no model\.ip_adapter is configured"):
        pipe.plan({"ip_adapter_image": "a.png"})
    assert pipe.plan({"controlnet_scales": None}).accepted == {"controlnet_scales": None}
    assert pipe.state == before
