"""engine.models: the builtin tiny model, source kinds, folders, files, LoRAs, clear errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDPMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from engine.models.builtin import BUILTIN_SPECS, build_tiny_models
from engine.models.device import resolve_device, resolve_dtype
from engine.models.errors import ModelLoadError
from engine.models.loader import ModelRequest, SourceKind, classify_source, load_models, load_vae
from engine.models.scheduler import alphas_cumprod_from_config
from engine.models.sources import BUILTIN_NAMES
from engine.models.tiny import TEXT_CONFIG, load_tiny_tokenizer
from engine.stream.modes import PredictionType

Q_WEIGHT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
Q_LORA = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _cpu(model_id: str, **kwargs: Any) -> ModelRequest:
    return ModelRequest(id=model_id, device="cpu", dtype="float32", local_files_only=True, **kwargs)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _save_pipeline(folder: Path, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    tiny = build_tiny_models(vae="full", prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=LCMScheduler.from_config(tiny.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A saved tiny diffusers folder, a saved tiny TAESD folder and a saved tiny UNet LoRA."""
    root = tmp_path_factory.mktemp("models")
    pipe = _save_pipeline(root / "sd")
    taesd = build_tiny_models(vae="taesd").vae
    taesd.save_pretrained(str(root / "taesd"))

    unet = build_tiny_models().unet
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    peft_state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        str(root / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(peft_state)
    )
    delta_q = peft_state[f"{Q_LORA}.lora_B.weight"] @ peft_state[f"{Q_LORA}.lora_A.weight"]
    return SimpleNamespace(
        root=root,
        sd=root / "sd",
        pipe=pipe,
        taesd_dir=root / "taesd",
        taesd=taesd,
        lora=root / "lora",
        lora_file=root / "lora" / "pytorch_lora_weights.safetensors",
        delta_q=delta_q,
    )


# ---------------------------------------------------------------- builtin tiny model


def test_tiny_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first, second = build_tiny_models(seed=3), build_tiny_models(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(first, name), getattr(second, name)), name
    assert not _same_weights(first.unet, build_tiny_models(seed=4).unet)
    assert first.identity == {"model": "builtin:tiny", "seed": 3, "vae": "taesd"}


def test_tiny_vae_choice_and_prediction_type() -> None:
    taesd, full = build_tiny_models(), build_tiny_models(vae="full", prediction_type="v_prediction")
    assert isinstance(taesd.vae, AutoencoderTiny)
    assert isinstance(full.vae, AutoencoderKL)
    assert _same_weights(taesd.unet, full.unet)  # each part has its own seed
    assert taesd.scheduler_config["prediction_type"] == "epsilon"
    assert full.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ModelLoadError, match="vae"):
        build_tiny_models(vae="big")
    with pytest.raises(ModelLoadError, match="sample"):
        build_tiny_models(prediction_type="sample")


def test_tokenizer_pads_truncates_and_round_trips() -> None:
    tokenizer = load_tiny_tokenizer()
    assert tokenizer.model_max_length == 77
    prompt = "a photo of a cat in a neon city at night, highly detailed"
    ids = tokenizer(
        [prompt, "word " * 200, "ünïcode ✨"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (3, 77)
    assert int(ids.max()) < TEXT_CONFIG["vocab_size"]
    assert int(ids.min()) >= 0
    assert ids[0, 0] == tokenizer.bos_token_id
    assert ids[1, -1] == tokenizer.eos_token_id  # truncated, still ends with end-of-text
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == prompt.replace(",", " ,")
    assert tokenizer.decode(ids[2], skip_special_tokens=True) == "ünïcode ✨"
    assert len(tokenizer(prompt).input_ids) < len(prompt) // 2  # merges do real work


def test_tiny_unet_and_text_encoder_shapes() -> None:
    tiny = build_tiny_models()
    ids = tiny.tokenizer(
        ["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        embeddings = tiny.text_encoder(ids)[0]
        assert embeddings.shape == (2, 77, 32)
        out = tiny.unet(torch.randn(2, 4, 32, 32), torch.tensor([999, 99]), embeddings).sample
    assert out.shape == (2, 4, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("vae", ["taesd", "full"])
def test_tiny_vae_round_trip_shapes(vae: str) -> None:
    model = build_tiny_models(vae=vae).vae
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(image)
        latent = encoded.latents if vae == "taesd" else encoded.latent_dist.mode()
        assert latent.shape == (1, 4, 32, 32)
        assert model.decode(latent).sample.shape == (1, 3, 256, 256)


# ---------------------------------------------------------------- schedule, device, dtype


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(schedule: str) -> None:
    config = {"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012}
    ours = alphas_cumprod_from_config(config)
    reference = DDPMScheduler(**config).alphas_cumprod
    assert ours.shape == (1000,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-7)
    assert alphas_cumprod_from_config({}).shape == (1000,)  # SD defaults


def test_alphas_cumprod_rejects_other_schedules() -> None:
    with pytest.raises(ModelLoadError, match="squaredcos_cap_v2"):
        alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2"})


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ModelLoadError, match="gpu0"):
        resolve_device("gpu0")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ModelLoadError, match="cuda:7"):
            resolve_device("cuda:7")


def test_resolve_dtype(caplog: pytest.LogCaptureFixture) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="engine.models.device"):
        assert resolve_dtype("float16", cpu) == torch.float16
    assert "float16 on cpu" in caplog.text
    with pytest.raises(ModelLoadError, match="int8"):
        resolve_dtype("int8", cpu)


# ---------------------------------------------------------------- sources


def test_classify_source(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    (tmp_path / "old.ckpt").write_bytes(b"")
    assert classify_source("builtin:tiny") is SourceKind.BUILTIN
    assert classify_source(str(checkpoint)) is SourceKind.SINGLE_FILE
    assert classify_source(str(tmp_path / "old.ckpt")) is SourceKind.SINGLE_FILE
    assert classify_source(str(tmp_path)) is SourceKind.LOCAL_FOLDER
    assert classify_source("stabilityai/sd-turbo") is SourceKind.HUB_ID


@pytest.mark.parametrize(
    ("model_id", "words"),
    [
        ("builtin:foo", "builtin:tiny"),
        ("./no/such/model.safetensors", "not an existing file or folder"),
        ("", "no model given"),
    ],
)
def test_classify_source_rejects(model_id: str, words: str) -> None:
    with pytest.raises(ModelLoadError, match=words) as caught:
        classify_source(model_id)
    assert repr(model_id) in str(caught.value) or not model_id


def test_classify_source_rejects_other_files(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors or \.ckpt"):
        classify_source(str(weights))


# ---------------------------------------------------------------- loading


def test_load_builtin_tiny() -> None:
    lines: list[str] = []
    bundle = load_models(_cpu("builtin:tiny"), progress=lines.append)
    assert isinstance(bundle.vae, AutoencoderTiny)
    assert bundle.prediction_type is PredictionType.EPSILON
    assert bundle.vae_scale_factor == 8 and bundle.latent_channels == 4
    assert bundle.vae_scaling_factor == 1.0
    assert bundle.alphas_cumprod.shape == (1000,) and bundle.alphas_cumprod.device.type == "cpu"
    assert bundle.identity["model"] == "builtin:tiny" and bundle.identity["seed"] == 0
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32
    assert bundle.original_inference_steps == 50
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert not bundle.unet.training
    assert any("builtin:tiny" in line for line in lines)

    full = load_models(_cpu("builtin:tiny", vae="full", prediction_type="v_prediction"))
    assert isinstance(full.vae, AutoencoderKL)
    assert (full.vae_scale_factor, full.vae_scaling_factor) == (8, 0.18215)
    assert full.prediction_type is PredictionType.V_PREDICTION
    assert _same_weights(bundle.unet, full.unet)


def test_load_diffusers_folder_full_vae(saved: SimpleNamespace) -> None:
    lines: list[str] = []
    bundle = load_models(_cpu(str(saved.sd), vae="full"), progress=lines.append)
    assert _same_weights(bundle.unet, saved.pipe.unet)
    assert _same_weights(bundle.vae, saved.pipe.vae)
    assert _same_weights(bundle.text_encoder, saved.pipe.text_encoder)
    assert isinstance(bundle.vae, AutoencoderKL)
    assert (bundle.vae_scale_factor, bundle.vae_scaling_factor) == (8, 0.18215)
    assert bundle.prediction_type is PredictionType.EPSILON
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.identity == {
        "model": str(saved.sd),
        "family": "sd",
        "vae": "full",
        "lcm_lora": None,
        "loras": [],
    }
    assert lines and all("\n" not in line for line in lines)


def test_load_diffusers_folder_with_local_taesd(saved: SimpleNamespace) -> None:
    bundle = load_models(_cpu(str(saved.sd), taesd_id=str(saved.taesd_dir)))
    assert isinstance(bundle.vae, AutoencoderTiny)
    assert _same_weights(bundle.vae, saved.taesd)
    assert (bundle.vae_scale_factor, bundle.vae_scaling_factor) == (8, 1.0)
    assert bundle.identity["taesd_id"] == str(saved.taesd_dir)


def test_missing_taesd_names_it(saved: SimpleNamespace) -> None:
    with pytest.raises(ModelLoadError, match="TAESD 'nobody/no-taesd'"):
        load_models(_cpu(str(saved.sd), taesd_id="nobody/no-taesd"))


def test_prediction_type_from_saved_scheduler_config(
    saved: SimpleNamespace, tmp_path: Path
) -> None:
    folder = tmp_path / "vpred"
    shutil.copytree(saved.sd, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    assert load_models(_cpu(str(folder), vae="full")).prediction_type is PredictionType.V_PREDICTION
    forced = load_models(_cpu(str(folder), vae="full", prediction_type="epsilon"))
    assert forced.prediction_type is PredictionType.EPSILON


@pytest.mark.parametrize(
    ("model_id", "words"),
    [
        ("/no/such/folder", "not an existing file or folder"),
        ("nobody/no-such-model", "could not be fetched from the hub"),
        ("builtin:foo", "unknown builtin model"),
    ],
)
def test_load_errors_name_the_model(model_id: str, words: str) -> None:
    with pytest.raises(ModelLoadError, match=words) as caught:
        load_models(_cpu(model_id))
    message = str(caught.value)
    assert repr(model_id) in message
    assert message.count("\n") <= 1 and "Traceback" not in message and ".." not in message


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not be loaded as a diffusers") as caught:
        load_models(_cpu(str(tmp_path)))
    assert isinstance(caught.value.__cause__, OSError)


# ---------------------------------------------------------------- LoRA


def _no_peft_left(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not any(
        "lora" in key for key in model.state_dict()
    )


def test_lora_fuses_into_plain_weights(saved: SimpleNamespace) -> None:
    base = saved.pipe.unet.state_dict()[Q_WEIGHT]
    one = load_models(_cpu(str(saved.sd), vae="full", loras=[(str(saved.lora), 1.0)]))
    half = load_models(_cpu(str(saved.sd), vae="full", loras=[(str(saved.lora_file), 0.5)]))
    fused_one, fused_half = one.unet.state_dict()[Q_WEIGHT], half.unet.state_dict()[Q_WEIGHT]
    torch.testing.assert_close(fused_one, base + saved.delta_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_half, base + 0.5 * saved.delta_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_half - base, 0.5 * (fused_one - base), rtol=0, atol=1e-5)
    assert saved.delta_q.abs().max() > 1e-3
    assert isinstance(
        half.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, torch.nn.Linear
    )
    assert _no_peft_left(one.unet) and _no_peft_left(half.unet)
    assert half.identity["loras"] == [[str(saved.lora_file), 0.5]]


def test_lcm_lora_and_lora_on_builtin(saved: SimpleNamespace) -> None:
    base = build_tiny_models().unet.state_dict()[Q_WEIGHT]
    bundle = load_models(
        _cpu("builtin:tiny", lcm_lora=str(saved.lora), loras=[(str(saved.lora_file), 0.5)])
    )
    fused = bundle.unet.state_dict()[Q_WEIGHT]
    torch.testing.assert_close(fused, base + 1.5 * saved.delta_q, rtol=0, atol=1e-5)
    assert _no_peft_left(bundle.unet)
    assert bundle.identity["lcm_lora"] == str(saved.lora)


def test_missing_lora_names_it(saved: SimpleNamespace, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match=r"LoRA .*nope\.safetensors.* not found"):
        load_models(_cpu(str(saved.sd), vae="full", loras=[(missing, 1.0)]))
    with pytest.raises(ModelLoadError, match="LoRA 'nobody/no-lora' could not be loaded"):
        load_models(_cpu("builtin:tiny", lcm_lora="nobody/no-lora"))


# ---------------------------------------------------------------- single file


def test_single_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    random_tensor = tmp_path / "random.safetensors"
    safetensors.torch.save_file({"x": torch.randn(3)}, str(random_tensor))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint") as caught:
        load_models(_cpu(str(random_tensor)))
    assert str(random_tensor) in str(caught.value)
    assert "could not be loaded" not in str(caught.value)  # wrapped once, not twice
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_models(_cpu(str(garbage)))


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",
}


def _unet_to_ldm(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Diffusers UNet keys → original LDM layout (inverse of diffusers' single-file converter)."""
    per = layers + 1
    up_with_attention = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        parts = key.split(".")
        if head in _UNET_FIXED_TO_LDM:
            new = f"{_UNET_FIXED_TO_LDM[head]}.{param}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                sub, _, tail = rest.partition(".")
                new = f"middle_block.{2 * int(parts[2])}.{_RESNET_TO_LDM[sub]}.{tail}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            sub, _, tail = rest.partition(".")
            down = parts[0] == "down_blocks"
            slot = (1 + block * per + index) if down else (block * per + index)
            prefix = f"{'input' if down else 'output'}_blocks.{slot}"
            if kind == "resnets":
                new = f"{prefix}.0.{_RESNET_TO_LDM[sub]}.{tail}"
            elif kind == "attentions":
                new = f"{prefix}.1.{rest}"
            elif down:  # downsamplers.0.conv.<param>
                new = f"input_blocks.{1 + block * per + layers}.0.op.{param}"
            else:
                position = 2 if block in up_with_attention else 1
                new = f"output_blocks.{block * per + layers}.{position}.conv.{param}"
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys → original LDM ``first_stage_model.*`` layout."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                sub, _, tail = rest.partition(".")
                tail = tail.removeprefix("0.")
                new = f"{side}.mid.attn_1.{_VAE_ATTN_TO_LDM[sub]}.{tail}"
                value = value[:, :, None, None] if value.ndim == 2 else value
        else:
            index = int(parts[2]) if side == "encoder" else blocks - 1 - int(parts[2])
            level = "down" if side == "encoder" else "up"
            rest = ".".join(parts[5:])
            if parts[3] == "resnets":
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{level}.{index}.block.{parts[4]}.{rest}"
            else:
                new = f"{side}.{level}.{index}.{level}sample.{rest}"
        out["first_stage_model." + new] = value
    return out


def test_single_file_round_trip_with_local_config(saved: SimpleNamespace, tmp_path: Path) -> None:
    pipe = saved.pipe
    checkpoint: dict[str, torch.Tensor] = {}
    checkpoint.update(_unet_to_ldm(pipe.unet.state_dict(), layers=1))
    checkpoint.update(_vae_to_ldm(pipe.vae.state_dict(), blocks=4))
    for key, value in pipe.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["cond_stage_model.transformer." + name] = value
    path = tmp_path / "tiny-sd.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))

    bundle = load_models(_cpu(str(path), vae="full", single_file_config=str(saved.sd)))
    assert _same_weights(bundle.unet, pipe.unet)
    assert _same_weights(bundle.vae, pipe.vae)
    assert _same_weights(bundle.text_encoder, pipe.text_encoder)
    assert bundle.identity["size"] == path.stat().st_size
    assert bundle.identity["mtime"] == path.stat().st_mtime
    assert bundle.source.startswith("single_file")


# ---------------------------------------------------------------- config section


def test_request_from_config_section() -> None:
    class Kind:
        def __init__(self, value: str) -> None:
            self.value = value

    section = SimpleNamespace(
        id="builtin:tiny",
        vae=Kind("full"),
        taesd_id="madebyollin/taesd",
        lcm_lora=None,
        loras=[SimpleNamespace(path="style.safetensors", scale=0.7, adapter_name=None)],
        prediction_type=Kind("auto"),
        device="cpu",
        dtype=Kind("float32"),
        cache_dir=None,
        local_files_only=True,
    )
    request = ModelRequest.from_config(section)
    assert request == ModelRequest(
        id="builtin:tiny",
        vae="full",
        taesd_id="madebyollin/taesd",
        loras=[("style.safetensors", 0.7)],
        device="cpu",
        dtype="float32",
        local_files_only=True,
    )
    assert isinstance(
        load_models(SimpleNamespace(id="builtin:tiny", device="cpu")).vae, AutoencoderTiny
    )


# ---------------------------------------------------------------- builtin:sd-turbo-shape


def test_sd_turbo_shape_has_sd_turbo_architecture() -> None:
    """Parameter counts of stabilityai/sd-turbo's parts (SD 2.1-base UNet, OpenCLIP ViT-H text
    tower with 23 layers, SD VAE, TAESD), built on the meta device (nothing allocated)."""
    spec = BUILTIN_SPECS["sd-turbo-shape"]
    factories = {
        "unet": lambda: UNet2DConditionModel(**spec.unet),
        "vae": lambda: AutoencoderKL(**spec.vae),
        "taesd": lambda: AutoencoderTiny(**spec.taesd),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**spec.text)),
    }
    with torch.device("meta"):
        modules = {name: factory() for name, factory in factories.items()}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == {
        "unet": 865_910_724,
        "vae": 83_653_863,
        "taesd": 2_445_063,
        "text_encoder": 340_387_840,
    }
    unet = modules["unet"].config
    assert (unet.cross_attention_dim, unet.sample_size, unet.use_linear_projection) == (1024, 64, True)
    assert tuple(unet.attention_head_dim) == (5, 10, 20, 20)
    # the tiny tokenizer's ids index the real-size embedding table
    assert len(load_tiny_tokenizer()) <= spec.text["vocab_size"]


def test_sd_turbo_shape_is_a_known_builtin_everywhere() -> None:
    from engine.config import ConfigError, load_config

    assert classify_source("builtin:sd-turbo-shape") is SourceKind.BUILTIN
    config = load_config(None, overrides=["model.id=builtin:sd-turbo-shape"])
    assert config.model.id == "builtin:sd-turbo-shape"
    with pytest.raises(ConfigError, match=re.escape("builtin:tiny | builtin:sd-turbo-shape")):
        load_config(None, overrides=["model.id=builtin:sd-turbo"])
    assert tuple(BUILTIN_SPECS) == BUILTIN_NAMES


@pytest.mark.parametrize("vae", ["taesd", "full"])
def test_load_vae_gives_the_builtin_vae_load_models_would(vae: str) -> None:
    alone = load_vae(_cpu("builtin:tiny"), vae, torch.device("cpu"), torch.float32)
    bundle = load_models(_cpu("builtin:tiny", vae=vae))
    assert type(alone) is type(bundle.vae)
    assert _same_weights(alone, bundle.vae)
    with pytest.raises(ModelLoadError, match="unknown vae 'big'"):
        load_vae(_cpu("builtin:tiny"), "big", torch.device("cpu"), torch.float32)
