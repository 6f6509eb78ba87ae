"""SDXL on builtin:tiny-sdxl: two text encoders, pooled embeddings and time ids, on every path."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from engine.accel.base import Conditioning
from engine.accel.torch_backend import TorchUNet
from engine.extensions.sdxl import ADDED_INPUTS
from engine.models.errors import ModelLoadError
from engine.models.family import detect_family, family_of_class
from engine.models.kinds import ModelFamily
from engine.models.loader import ModelRequest, load_models
from engine.models.sources import SourceKind
from engine.pipeline import StreamPipeline
from engine.runtime.changes import apply_change
from engine.stream.modes import CfgType
from engine.stream.pooled import pack_pooled, split_pooled, time_ids
from tests.fakes import SIZE, pipeline_settings


@pytest.fixture(scope="module")
def sdxl():
    return load_models(ModelRequest(id="builtin:tiny-sdxl", device="cpu", dtype="float32"))


def diffusers_pipe(models):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
        unet=models.unet,
        scheduler=LCMScheduler.from_config(models.scheduler_config),
    )


class CountingUNet:
    """The pipeline's UNet runner, recording each call's batch and added inputs."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[int, Conditioning | None]] = []

    def __call__(self, latents, timesteps, embeddings, conditioning=None):
        self.calls.append((latents.shape[0], conditioning))
        return self.inner(latents, timesteps, embeddings, conditioning)


class CountingEncoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def pooled(pipe: StreamPipeline) -> torch.Tensor:
    """The pooled text embeddings ``(B, P)`` of the pipeline's UNet call now."""
    return pipe.extensions["sdxl"].text_embeds


def make(models, **overrides) -> StreamPipeline:
    values = {"prompt": "a neon jellyfish", "negative_prompt": "blurry", "guidance_scale": 1.0, **overrides}
    pipe = StreamPipeline(models, pipeline_settings(**values))
    pipe.runners = dataclasses.replace(pipe.runners, unet=CountingUNet(pipe.runners.unet))
    return pipe


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- the conditioning
def test_prompts_equal_diffusers_encode_prompt(sdxl):
    pipe = StreamPipeline(sdxl, pipeline_settings(prompt="a neon jellyfish", negative_prompt="blurry"))
    reference = diffusers_pipe(sdxl)
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = reference.encode_prompt(
            "a neon jellyfish", device=torch.device("cpu"), negative_prompt="blurry"
        )
    tokens, ours_pooled = split_pooled(pipe.layout.positive, sdxl.pooled_dim)
    assert tokens.shape == (1, 77, 64) and ours_pooled.shape == (1, 32)
    assert torch.allclose(tokens, embeds, atol=1e-6) and torch.allclose(ours_pooled, pooled, atol=1e-6)
    neg_tokens, neg_pooled = split_pooled(pipe.layout.negative, sdxl.pooled_dim)
    assert torch.allclose(neg_tokens, negative, atol=1e-6) and torch.allclose(
        neg_pooled, negative_pooled, atol=1e-6
    )


def test_an_empty_negative_prompt_is_zeros_as_in_diffusers(sdxl):
    pipe = StreamPipeline(sdxl, pipeline_settings(negative_prompt=""))
    assert not pipe.layout.negative.any()


def test_pack_split_and_time_ids():
    hidden, pooled = torch.randn(1, 77, 64), torch.randn(1, 32)
    packed = pack_pooled(hidden, pooled)
    assert packed.shape == (1, 78, 64) and not packed[0, 0, 32:].any()
    tokens, back = split_pooled(packed.expand(3, -1, -1), 32)
    assert torch.equal(tokens[1], hidden[0]) and torch.equal(back[2], pooled[0])
    with pytest.raises(ValueError, match="do not fit"):
        pack_pooled(torch.randn(1, 77, 16), pooled)
    ids = time_ids(512, 768, 2, torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[512.0, 768.0, 0.0, 0.0, 512.0, 768.0]] * 2


def test_a_prompt_change_runs_both_encoders_once(sdxl):
    first, second = CountingEncoder(sdxl.text_encoder), CountingEncoder(sdxl.text_encoder_2)
    models = dataclasses.replace(sdxl, text_encoder=first, text_encoder_2=second)
    pipe = StreamPipeline(models, pipeline_settings(prompt="a", negative_prompt="b"))
    assert (first.calls, second.calls) == (2, 2)  # prompt and negative prompt at start
    before = pipe.layout.unet_embeddings.clone(), pooled(pipe).clone()
    apply_change(pipe, {"prompt": "a glowing forest"})
    assert (first.calls, second.calls) == (3, 3)
    assert not torch.equal(before[0], pipe.layout.unet_embeddings)
    assert not torch.equal(before[1], pooled(pipe)), "the pooled embeddings follow the prompt"
    apply_change(pipe, {"seed": 5, "guidance_scale": 1.3})
    apply_change(pipe, {"prompt": "a"})  # cached: neither encoder runs
    assert (first.calls, second.calls) == (3, 3)
    assert torch.equal(before[1], pooled(pipe))


# ---------------------------------------------------------------- the stream batch
def sequential(models, pipe: StreamPipeline, frame: torch.Tensor, guidance: float) -> torch.Tensor:
    """The n LCM steps one after another, the UNet conditioned as diffusers' SDXL pipeline does."""
    b, s = pipe.batch, pipe.batch.schedule
    with torch.inference_mode():
        cond, uncond, pooled, uncond_pooled = diffusers_pipe(models).encode_prompt(
            pipe.state["prompt"], device=torch.device("cpu"), negative_prompt=pipe.state["negative_prompt"]
        )
        ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

        def eps_of(x, t, hidden, text_embeds):
            added = {"text_embeds": text_embeds, "time_ids": ids}
            return models.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

        z = pipe.runners.vae.encode(frame)
        x = s.alpha[0] * z + s.beta[0] * b.noise[:1]
        for i in range(b.n):
            t = s.timesteps[i : i + 1]
            eps = eps_of(x, t, cond, pooled)
            if b.cfg_type is CfgType.FULL and guidance > 1:
                eps_u = eps_of(x, t, uncond, uncond_pooled)
                eps = eps_u + guidance * (eps - eps_u)
            x0 = s.c_out[i] * (x - s.beta[i] * eps) / s.alpha[i] + s.c_skip[i] * x
            if i < b.n - 1:
                x = s.alpha[i + 1] * x0 + s.beta[i + 1] * b.noise[i + 1 : i + 2]
        return pipe.runners.vae.decode(x0)


@pytest.mark.parametrize("t_index_list", [[45], [32, 45], [0, 16, 32, 45]])
@pytest.mark.parametrize("cfg", [CfgType.NONE, CfgType.FULL])
def test_stream_batch_equals_sequential(sdxl, t_index_list, cfg):
    guidance = 1.5 if cfg is CfgType.FULL else 1.0
    pipe = make(sdxl, t_index_list=t_index_list, cfg_type=cfg, guidance_scale=guidance)
    frame = image(1)
    n = len(t_index_list)
    outputs = [pipe(frame) for _ in range(n + 2)]
    assert all(o is None for o in outputs[: n - 1])
    expected = sequential(sdxl, pipe, frame, guidance).clamp(-1, 1)
    for out in outputs[n - 1 :]:
        assert out is not None
        assert float((out - expected).norm() / expected.norm()) <= 1e-5


@pytest.mark.parametrize(("cfg", "batch"), [("none", 3), ("self", 3), ("onetime", 4), ("full", 6)])
def test_unet_batch_and_added_inputs_per_cfg_mode(sdxl, cfg, batch):
    pipe = make(sdxl, t_index_list=[0, 16, 32], cfg_type=CfgType(cfg), guidance_scale=1.5)
    for k in range(3):
        pipe(image(k))
    calls = pipe.runners.unet.calls
    assert [b for b, _ in calls] == [batch] * 3 and pipe.unet_batch_size == batch
    conditioning = calls[-1][1]
    assert conditioning is not None and "text_embeds" in conditioning.inputs
    text_embeds, ids = conditioning.inputs["text_embeds"], conditioning.inputs["time_ids"]
    assert text_embeds.shape == (batch, 32) and ids.shape == (batch, 6)
    if cfg == "full":  # the unconditional half carries the negative prompt's pooled embeddings
        _, negative_pooled = split_pooled(pipe.layout.negative, 32)
        assert torch.equal(text_embeds[0], negative_pooled[0])
        assert not torch.equal(text_embeds[0], text_embeds[-1])


def test_blends_crossfade_cross_frame_filter_and_resolution(sdxl):
    models = dataclasses.replace(sdxl, unet=copy.deepcopy(sdxl.unet))  # cross-frame attention goes on it
    pipe = StreamPipeline(models, pipeline_settings(t_index_list=[32], cross_frame_attention=True))
    frame = image(2)
    plain = pipe(frame)
    apply_change(pipe, {"prompt_blend": [("a cat", 0.5), ("a dog", 0.5)], "seed_blend": [(1, 0.5), (2, 0.5)]})
    blended = pipe(frame)
    assert plain is not None and blended is not None and not torch.allclose(plain, blended, atol=1e-4)
    previous = pipe.current_positive.clone()
    apply_change(pipe, {"prompt": "a forest"})
    pipe.set_prompt_transition(previous, 0.5)  # a /prompt crossfade halfway
    halfway = pooled(pipe).clone()
    pipe.set_prompt_transition(None, 1.0)
    assert not torch.equal(halfway, pooled(pipe)), "the pooled embeddings crossfade too"
    apply_change(pipe, {"similarity_filter_enabled": True, "similarity_filter_threshold": 0.5})
    pipe(frame)
    skipped = pipe.stats.skipped
    for _ in range(4):
        pipe(frame)
    assert pipe.stats.skipped > skipped, "a static input is skipped"
    apply_change(pipe, {"resolution": [96, 64]})
    out = pipe(torch.rand((1, 3, 64, 96)) * 2 - 1)
    assert out is not None and out.shape == (1, 3, 64, 96)
    ids = pipe.extensions["sdxl"].time_ids
    assert ids[0].tolist() == [64.0, 96.0, 0.0, 0.0, 64.0, 96.0], "time ids follow the size"


def test_a_controlnet_steers_sdxl_and_scale_zero_adds_nothing(sdxl):
    from engine.models.controlnet import build_random_controlnet
    from engine.pipeline import ControlNetSettings

    controlled = dataclasses.replace(sdxl, controlnets=[build_random_controlnet(sdxl.unet)])
    frames = [image(k) for k in range(4)]

    def run(models, *controls):
        pipe = StreamPipeline(models, pipeline_settings(t_index_list=[20, 35], controlnets=controls))
        return [pipe(f) for f in frames][-1]

    plain = run(sdxl)
    assert torch.equal(run(controlled, ControlNetSettings(scale=0.0)), plain)
    assert not torch.allclose(run(controlled, ControlNetSettings(scale=1.0)), plain, atol=1e-3)


# ---------------------------------------------------------------- export and engines
def test_the_onnx_graph_takes_the_added_inputs_and_equals_torch(sdxl, tmp_path):
    pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])"
    )
    from engine.accel.onnx_export import export_unet
    from engine.accel.onnxruntime_backend import OrtUNet

    pipe = StreamPipeline(sdxl, pipeline_settings(t_index_list=[20, 35], cfg_type=CfgType.ONETIME))
    shape = pipe.unet_shape()
    assert shape.pooled_dim == 32 and list(shape.io.inputs)[3:5] == list(ADDED_INPUTS)
    path = export_unet(sdxl.unet, shape, tmp_path / "unet.onnx")
    ort, torch_runner = OrtUNet(path, shape), TorchUNet.of(sdxl)
    latents, timesteps, embeddings = pipe.unet_inputs()
    added = pipe.extensions["sdxl"].conditioning()
    got, want = (
        ort(latents, timesteps, embeddings, added),
        torch_runner(latents, timesteps, embeddings, added),
    )
    assert torch.allclose(got, want, atol=1e-4)
    ids = time_ids(128, 64, shape.batch, latents.device, latents.dtype)
    other = Conditioning({"text_embeds": added.inputs["text_embeds"], "time_ids": ids})
    assert not torch.allclose(ort(latents, timesteps, embeddings, other), got, atol=1e-4), (
        "time_ids are inputs"
    )
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        ort(latents, timesteps, embeddings)


def test_the_pipeline_on_onnxruntime_matches_torch(sdxl, tmp_path):
    pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed (pip install latentstage[onnx])"
    )
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape
    from engine.runtime.changes import open_pipeline

    settings = pipeline_settings(t_index_list=[32, 45], cfg_type=CfgType.SELF, guidance_scale=1.4, seed=7)
    backend = OnnxRuntimeBackend(
        sdxl, VaeShape(SIZE, SIZE), AccelSettings(BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
    )
    ort, reference = open_pipeline(sdxl, settings, backend), StreamPipeline(sdxl, settings)
    emitted = 0
    for k in range(5):
        frame = torch.roll(image(4), shifts=3 * k, dims=3)
        expected, actual = reference(frame), ort(frame)
        assert (expected is None) == (actual is None)
        if expected is not None:
            emitted += 1
            assert float((actual - expected).abs().max()) <= 1e-3
    assert emitted == 4
    backend.close()


def test_the_tensorrt_profile_has_the_added_inputs():
    from engine.accel import tensorrt_backend as trtb
    from engine.accel.base import UNetShape

    shape = UNetShape(
        batch=3, latent_channels=4, latent_height=64, latent_width=64, text_dim=2048, pooled_dim=1280
    )
    profile = trtb.static_profile(shape, "unet")
    assert list(profile) == ["latents", "timesteps", "embeddings", "text_embeds", "time_ids"]
    assert profile["text_embeds"] == ((3, 1280),) * 3 and profile["time_ids"] == ((3, 6),) * 3


def test_the_engine_cache_key_names_the_architecture(bundle, sdxl, tmp_path):
    from engine.accel.backends import AccelSettings, BackendKind, OnnxRuntimeBackend
    from engine.accel.base import VaeShape

    assert sdxl.identity["family"] == "sdxl" and bundle.identity["family"] == "sd"

    def key(models):
        accel = AccelSettings(backend=BackendKind.ONNXRUNTIME, engine_dir=str(tmp_path))
        backend = OnnxRuntimeBackend(models, VaeShape(SIZE, SIZE), accel)
        return backend.unet_keys([StreamPipeline(models, pipeline_settings()).unet_shape()])[0]

    relabelled = dataclasses.replace(sdxl, identity={**sdxl.identity, "family": "sd"})
    assert key(sdxl).digest() != key(relabelled).digest()


# ---------------------------------------------------------------- loading
def test_the_family_is_read_from_model_index_and_single_files(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert detect_family(SourceKind.LOCAL_FOLDER, str(folder), None, True) is ModelFamily.SDXL
    checkpoint = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(checkpoint))
    assert detect_family(SourceKind.SINGLE_FILE, str(checkpoint), None, True) is ModelFamily.SDXL
    assert detect_family(SourceKind.HUB_ID, "nobody/not-cached", None, True) is ModelFamily.SD
    with pytest.raises(ModelLoadError, match="StableDiffusion3Pipeline; supported"):
        family_of_class("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3")


def test_a_saved_sdxl_folder_loads_as_sdxl_with_the_same_weights(sdxl, tmp_path):
    from engine.models.builtin import build_builtin_models

    built = build_builtin_models("tiny-sdxl", vae="full")
    diffusers_pipe(built).save_pretrained(str(tmp_path / "xl"))
    loaded = load_models(
        ModelRequest(
            id=str(tmp_path / "xl"), vae="full", device="cpu", dtype="float32", local_files_only=True
        )
    )
    assert loaded.family is ModelFamily.SDXL and loaded.pooled_dim == 32
    assert loaded.identity["family"] == "sdxl"
    a, b = loaded.text_encoder_2.state_dict(), sdxl.text_encoder_2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    settings = pipeline_settings(t_index_list=[32])
    assert torch.allclose(
        StreamPipeline(loaded, settings)(image(5)),
        StreamPipeline(
            dataclasses.replace(sdxl, vae=loaded.vae, vae_scaling_factor=loaded.vae_scaling_factor), settings
        )(image(5)),
        atol=1e-5,
    )


def test_an_sdxl_lora_reaching_both_text_encoders_is_fused_and_rescaled(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from engine.models.builtin import build_builtin_models

    built = build_builtin_models("tiny-sdxl")
    text = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(text, built.text_encoder)
    inject_adapter_in_model(text, built.text_encoder_2)
    built.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(built.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(built.text_encoder)
        ),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(built.text_encoder_2)
        ),
    )
    request = ModelRequest(
        id="builtin:tiny-sdxl", device="cpu", dtype="float32", loras=[(str(tmp_path), 1.0)]
    )
    models = load_models(request)
    factors = models.lora_factors[0]
    assert factors.unet and factors.text_encoder and factors.text_encoder_2
    pipe = StreamPipeline(models, pipeline_settings())
    before = pooled(pipe).clone()
    apply_change(pipe, {"lora_scales": [0.0]})
    plain = StreamPipeline(
        load_models(ModelRequest(id="builtin:tiny-sdxl", device="cpu", dtype="float32")), pipeline_settings()
    )
    assert not torch.allclose(before, pooled(pipe), atol=1e-5)
    assert torch.allclose(pooled(pipe), pooled(plain), atol=1e-5), "scale 0 is the model without it"


def test_sdxl_takes_taesdxl_by_default(tmp_path):
    from engine.models.builtin import build_builtin_models

    diffusers_pipe(build_builtin_models("tiny-sdxl", vae="full")).save_pretrained(str(tmp_path / "xl"))
    request = ModelRequest(id=str(tmp_path / "xl"), device="cpu", dtype="float32", local_files_only=True)
    with pytest.raises(ModelLoadError, match="TAESD 'madebyollin/taesdxl' could not be loaded"):
        load_models(request)  # offline here: the family's TAESD is named in the error


def test_the_full_sdxl_vae_stays_float32_under_float16():
    from engine.accel.torch_backend import TorchVae

    request = ModelRequest(id="builtin:tiny-sdxl", vae="full", device="cpu", dtype="float16")
    models = load_models(request)
    assert models.unet.dtype == torch.float16 and models.vae.dtype == torch.float32
    vae = TorchVae(models.vae, models.vae_scaling_factor)
    latents = vae.encode(image(6).half())
    assert latents.dtype == torch.float16 and vae.decode(latents).dtype == torch.float16
    sd = load_models(ModelRequest(id="builtin:tiny", vae="full", device="cpu", dtype="float16"))
    assert sd.vae.dtype == torch.float16, "SD's VAE runs in float16 as before"
    taesd = load_models(dataclasses.replace(request, vae="taesd"))
    assert taesd.vae.dtype == torch.float16, "TAESDXL runs in float16"


def test_an_ip_adapter_steers_sdxl_and_scale_zero_adds_nothing(sdxl, tmp_path):
    from PIL import Image

    from engine.models.ip_adapter import build_tiny_ip_adapter, install_ip_adapter

    Image.new("RGB", (32, 32), (200, 30, 90)).save(tmp_path / "ref.png")
    unet = copy.deepcopy(sdxl.unet)
    adapter = build_tiny_ip_adapter(unet)
    install_ip_adapter(unet, adapter)
    adapted = dataclasses.replace(sdxl, unet=unet, ip_adapter=adapter)
    frames = [image(k) for k in range(3)]

    def run(models, **values):
        pipe = StreamPipeline(
            models, pipeline_settings(t_index_list=[20, 35], image_folder=str(tmp_path), **values)
        )
        return [pipe(f) for f in frames][-1]

    plain = run(sdxl)
    assert torch.equal(run(adapted, ip_adapter_image="ref.png", ip_adapter_scale=0.0), plain)
    assert not torch.allclose(
        run(adapted, ip_adapter_image="ref.png", ip_adapter_scale=1.0), plain, atol=1e-3
    )
