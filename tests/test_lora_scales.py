"""Live LoRA scales: exact in-place rescaling, the pipeline parameter, and each backend's answer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from engine import params
from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend, TensorRTBackend
from engine.accel.base import VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.control.dispatch import osc_args
from engine.models.builtin import build_tiny_models
from engine.models.loader import ModelRequest, load_models
from engine.models.lora import rescale_loras, touched_parameters
from engine.params import ParamError
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.changes import apply_change, open_pipeline
from engine.stream.modes import CfgType
from tests.fakes import SIZE


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny UNet LoRA on attention projections and a 3x3 conv."""
    unet = build_tiny_models().unet
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
            init_lora_weights=False,
        )
    )
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    return str(folder)


def load(lora: str, scale: float):
    request = ModelRequest(
        id="builtin:tiny", device="cpu", dtype="float32", local_files_only=True, loras=[(lora, scale)]
    )
    return load_models(request)


def close(a: torch.nn.Module, b: torch.nn.Module) -> float:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def test_rescale_matches_loading_at_that_scale_and_returns(lora: str) -> None:
    one, half = load(lora, 1.0), load(lora, 0.5)
    original = {k: v.clone() for k, v in one.unet.state_dict().items()}
    assert len(one.lora_factors) == 1 and one.lora_scales == [1.0]
    factors = one.lora_factors[0]
    assert any(low.down.dim() == 4 for low in factors.unet.values())  # the conv path is covered
    assert not factors.unsupported and not factors.text_encoder
    assert close(one.unet, half.unet) > 1e-3
    touched = rescale_loras(one.unet, one.lora_factors, [1.0], [0.5])
    assert touched == touched_parameters(one.lora_factors)
    assert close(one.unet, half.unet) <= 1e-5
    rescale_loras(one.unet, one.lora_factors, [0.5], [1.0])
    assert max(float((v - original[k]).abs().max()) for k, v in one.unet.state_dict().items()) <= 1e-5


def settings() -> PipelineSettings:
    return PipelineSettings(
        width=SIZE, height=SIZE, t_index_list=[32, 45], cfg_type=CfgType.SELF, prompt="a test"
    )


def frames(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand((1, 3, SIZE, SIZE), generator=g) * 2 - 1 for _ in range(count)]


def run(pipe: StreamPipeline, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [out for out in (pipe(x) for x in inputs) if out is not None]


def test_pipeline_lora_scale_equals_loading_at_that_scale(lora: str) -> None:
    inputs = frames(4)
    live = StreamPipeline(load(lora, 1.0), settings())
    before = run(StreamPipeline(load(lora, 1.0), settings()), inputs)
    assert live.state["lora_scales"] == [1.0]
    assert apply_change(live, {"lora_scales": [0.0]}) == {"lora_scales": [0.0]}
    reference = run(StreamPipeline(load(lora, 0.0), settings()), inputs)
    got = run(live, inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(got, reference, strict=True)) <= 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(got, before, strict=True)) > 1e-4
    assert live.models.lora_scales == [0.0] and live.models.identity["loras"][0][1] == 0.0
    apply_change(live, {"lora_scales": None})  # back to the configured scales
    assert live.state["lora_scales"] == [1.0]


@pytest.mark.parametrize(
    ("value", "words"),
    [([0.5, 0.5], "exactly 1"), ([5.0], "out of range"), ([math.nan], "not finite"), ([], "0 items")],
)
def test_bad_lora_scales_change_nothing(lora: str, value: list[float], words: str) -> None:
    pipe = StreamPipeline(load(lora, 1.0), settings())
    state, weights = dict(pipe.state), {k: v.clone() for k, v in pipe.models.unet.state_dict().items()}
    with pytest.raises(ParamError, match=words):
        apply_change(pipe, {"lora_scales": value, "seed": 9})
    assert pipe.state == state
    assert all(torch.equal(v, weights[k]) for k, v in pipe.models.unet.state_dict().items())


def test_lora_scales_without_loras_is_refused() -> None:
    pipe = StreamPipeline(load_models(ModelRequest(id="builtin:tiny", device="cpu")), settings())
    with pytest.raises(ParamError, match=r"no model\.loras"):
        apply_change(pipe, {"lora_scales": [1.0]})
    assert apply_change(pipe, {"lora_scales": None}) == {"lora_scales": None}  # a scene: no-op


def test_registry_and_osc() -> None:
    spec = params.get("lora_scales")
    assert spec.osc_address == "/lora_scales" and spec.osc_args == "f+" and spec.default is None
    assert spec.coerce([1, 0.5]) == [1.0, 0.5]
    assert osc_args(spec, [1.0, 0.5]) == [1.0, 0.5]
    with pytest.raises(ParamError):
        spec.coerce([0.0] * 17)


def test_osc_dispatch_accepts_a_float_list() -> None:
    from engine.control.dispatch import OscDispatcher
    from engine.control.state import ControlState

    state = ControlState(applied={"lora_scales": None})
    dispatcher = OscDispatcher(state, state.applied, lambda action, name, due=None: None)
    dispatcher.handle_message("/lora_scales", [0.25, 1], ("127.0.0.1", 1))
    taken = state.take_for_encoding(0.0)
    if taken is not None:
        state.release_encoded(*taken)
    pending = state.take_pending()
    assert pending is not None and pending.changes == {"lora_scales": [0.25, 1.0]}
    replies = dispatcher.handle_message("/lora_scales", [0.25, "x"], ("127.0.0.1", 1))
    assert replies  # refused with an /engine/error answer


class FakeTrtRunner(TorchUNet):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__(unet)
        self.refits: list[dict[str, torch.Tensor]] = []

    def refit(self, weights: dict[str, torch.Tensor]) -> None:
        self.refits.append(dict(weights))


def trt_pipeline(bundle, tmp_path, refittable: bool):
    """``(backend, pipeline)`` on a TensorRT backend with fake engines, and the state it starts in."""
    pytest.importorskip("onnx")
    backend = trt_backend(bundle, tmp_path, refittable)
    pipe = open_pipeline(bundle, settings(), backend)
    return backend, pipe, dict(pipe.state)


def trt_backend(bundle, tmp_path, refittable: bool) -> TensorRTBackend:
    accel = AccelSettings(backend=BackendKind.TENSORRT, engine_dir=str(tmp_path), refittable=refittable)
    backend = TensorRTBackend(bundle, VaeShape(SIZE, SIZE), accel)
    backend._runtime_fields = lambda: {  # type: ignore[method-assign]
        "tensorrt_version": "-", "gpu_name": "test", "compute_capability": "-"
    }

    def load_unet(shape, progress):
        key = backend._key("unet", shape)
        backend._onnx(dataclasses.replace(key, tensorrt_version="-", refittable=False), shape, progress)
        return FakeTrtRunner(bundle.unet)

    backend._load_unet = load_unet  # type: ignore[method-assign]
    backend._load_vae = lambda shape, progress: TorchVae(bundle.vae, bundle.vae_scaling_factor)  # type: ignore[method-assign]
    return backend


def test_tensorrt_not_refittable_says_rebuild(lora: str, tmp_path) -> None:
    bundle = load(lora, 1.0)
    backend, pipe, state = trt_pipeline(bundle, tmp_path, False)
    with pytest.raises(ParamError, match="rebuild"):
        apply_change(pipe, {"lora_scales": [0.5]}, backend)
    assert pipe.state == state


def test_tensorrt_refit_waits_for_a_running_engine_build(lora: str, tmp_path) -> None:
    """A refit during a background build would miss the engine being built from the old weights."""
    import threading

    bundle = load(lora, 1.0)
    backend, pipe, state = trt_pipeline(bundle, tmp_path, True)
    building = threading.Lock()
    backend._flights[pipe.unet_shape(n=3)] = building
    with building:  # what prepare_unet holds while it exports / builds
        with pytest.raises(ParamError, match="being built"):
            apply_change(pipe, {"lora_scales": [0.5]}, backend)
        assert pipe.state == state and pipe.runners.unet.refits == []
    apply_change(pipe, {"lora_scales": [0.5]}, backend)
    assert len(pipe.runners.unet.refits) == 1


def test_tensorrt_refittable_refits_the_touched_initializers(lora: str, tmp_path) -> None:
    pytest.importorskip("onnx")
    from engine.accel.onnx_export import initializer_map

    bundle, half = load(lora, 1.0), load(lora, 0.5)
    backend = trt_backend(bundle, tmp_path, True)
    pipe = open_pipeline(bundle, settings(), backend)
    runner = pipe.runners.unet
    assert isinstance(runner, FakeTrtRunner)
    onnx_path = next(tmp_path.rglob("unet.onnx"))
    touched = touched_parameters(bundle.lora_factors)
    names = initializer_map(onnx_path, bundle.unet, touched)
    assert any(t for _, t in names.values()) and len({n for n, _ in names.values()}) == len(touched)
    apply_change(pipe, {"lora_scales": [0.5]}, backend)
    (payload,) = runner.refits
    assert set(payload) == {n for n, _ in names.values()}
    expected = half.unet.state_dict()
    for torch_name, (init_name, transposed) in names.items():
        want = expected[torch_name].T if transposed else expected[torch_name]
        assert float((payload[init_name] - want).abs().max()) <= 1e-5
    assert close(bundle.unet, half.unet) <= 1e-5  # the torch UNet follows after the refit
    apply_change(pipe, {"lora_scales": [1.0]}, backend)  # second refit reuses the name map
    assert len(runner.refits) == 2


def test_onnxruntime_says_reexport(lora: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    bundle = load(lora, 1.0)
    accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    backend = OnnxRuntimeBackend(bundle, VaeShape(SIZE, SIZE), accel)
    pipe = open_pipeline(bundle, settings(), backend)
    state = dict(pipe.state)
    with pytest.raises(ParamError, match="re-export"):
        apply_change(pipe, {"lora_scales": [0.5]}, backend)
    assert pipe.state == state


@pytest.fixture(scope="module")
def text_lora(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LoRA on the text encoder's attention (and the UNet's), as style LoRAs often are."""
    tiny = build_tiny_models()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, tiny.text_encoder)  # transformers' add_adapter wants a newer peft
    tiny.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("text_lora")
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(tiny.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(tiny.text_encoder)),
    )
    return str(folder)


def test_a_text_encoder_lora_change_encodes_the_prompts_again(text_lora: str) -> None:
    """The prompt cache holds embeddings of the old text-encoder weights: a rescale must not reuse them."""
    models = load(text_lora, 1.0)
    assert models.lora_factors[0].text_encoder, "the LoRA reaches the text encoder"
    pipe = StreamPipeline(models, settings())
    before = pipe.layout.positive.clone()
    apply_change(pipe, {"lora_scales": [0.0]})
    fresh = StreamPipeline(load(text_lora, 0.0), settings())
    assert not torch.allclose(pipe.layout.positive, before, atol=1e-4)
    positive = pipe.layout.positive
    assert torch.allclose(positive, fresh.layout.positive, atol=1e-5), "encoded with the new weights"
