"""The builtin tiny random-weight SD-style model: runs anywhere, downloads nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.models.errors import ModelLoadError
from engine.models.scheduler import (
    DEFAULT_ORIGINAL_INFERENCE_STEPS,
    SD_BETA_END,
    SD_BETA_SCHEDULE,
    SD_BETA_START,
    SD_NUM_TRAIN_TIMESTEPS,
)
from engine.stream.modes import PredictionType, allowed

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "builtin:tiny"
TINY_TOKENIZER_DIR = Path(__file__).with_name("tiny_tokenizer")
MAX_TOKENS = 77

# Latent (B, 4, 32, 32) at a 256x256 image; cross-attention on (B, 77, 32) text embeddings.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# TAESD layout with 16 channels instead of 64: 4 blocks, 3 stride-2 stages, 8x scale factor.
TAESD_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": (16, 16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16, 16),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
    "scaling_factor": 1.0,
}

# SD VAE layout: 4 down blocks (3 downsamples, 8x scale factor), scaling factor 0.18215.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}

_SEED_OFFSETS = {"unet": 0, "taesd": 1, "vae": 2, "text_encoder": 3}

_M = TypeVar("_M")


@dataclass
class TinyModels:
    """The tiny model's parts, on the CPU in float32, in eval mode without gradients.

    Attributes:
        unet: ``UNet2DConditionModel``; ``unet(latents (B,4,32,32), t (B,), emb (B,77,32)).sample``.
        vae: ``AutoencoderTiny`` (TAESD layout) or ``AutoencoderKL``; 256² image <-> 32² latent.
        text_encoder: ``CLIPTextModel``; ``text_encoder(ids (B,77))[0]`` is ``(B,77,32)``.
        tokenizer: ``CLIPTokenizer`` with ``model_max_length`` 77, vocabulary of 1000.
        scheduler_config: an LCM scheduler config (SD scaled_linear betas, 1000 steps).
        identity: ``{"model": "builtin:tiny", "seed": seed}`` plus the VAE kind.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer shipped in ``tiny_tokenizer/`` (byte-level BPE, ids < 1000, 77 tokens)."""
    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), model_max_length=MAX_TOKENS)


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """An ``LCMScheduler`` config with the SD 1.x beta schedule and ``prediction_type``."""
    return {
        "_class_name": "LCMScheduler",
        "num_train_timesteps": SD_NUM_TRAIN_TIMESTEPS,
        "beta_start": SD_BETA_START,
        "beta_end": SD_BETA_END,
        "beta_schedule": SD_BETA_SCHEDULE,
        "original_inference_steps": DEFAULT_ORIGINAL_INFERENCE_STEPS,
        "prediction_type": prediction_type,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "timestep_scaling": 10.0,
        "clip_sample": False,
    }


def _seeded(seed: int, factory: Callable[[], _M]) -> _M:
    """Build a module with the CPU RNG seeded, restoring the global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    prepared: Any = module
    prepared.eval()
    prepared.requires_grad_(False)
    return module


def _calibration_images(size: int = 64) -> torch.Tensor:
    """Four fixed colourful images ``(4, 3, size, size)`` in [-1, 1] (no RNG involved)."""
    axis = torch.linspace(0.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = []
    for k in range(4):
        phase = 1.7 * k
        images.append(
            torch.stack(
                [
                    torch.sin(6.0 * x + phase),
                    torch.cos(5.0 * y - phase),
                    torch.sin(4.0 * (x + y) + 2 * phase),
                ]
            )
        )
    return torch.stack(images)


def _rescale_output(
    conv: torch.nn.Conv2d, output: torch.Tensor, mean: float, std: float, channels: int
) -> None:
    """Scale and shift ``conv``'s first ``channels`` outputs to the given mean and std."""
    observed_mean = output[:, :channels].mean(dim=(0, 2, 3))
    observed_std = output[:, :channels].std(dim=(0, 2, 3)).clamp_min(1e-6)
    scale = std / observed_std
    conv.weight[:channels] *= scale.view(-1, 1, 1, 1)
    assert conv.bias is not None
    conv.bias[:channels] = (conv.bias[:channels] - observed_mean) * scale + mean


@torch.no_grad()
def _calibrate_vae(vae: Any) -> None:
    """Give the random VAE a usable range: latents ~ N(0, 1) after scaling, images mid-grey ± colour.

    With plain random weights the tiny TAESD decodes everything to black (about -1.1), so
    the offline demo would show a black screen. Rescaling the last layer of the encoder and
    of the decoder on fixed images keeps the weights deterministic and the output visible
    and input-dependent; it stays a random-weight model, not a trained one.
    """
    images = _calibration_images()
    if isinstance(vae, AutoencoderTiny):
        taesd: Any = vae  # diffusers' modules are untyped for mypy
        encoder_out = taesd.encoder.layers[-1]
        _rescale_output(encoder_out, taesd.encoder(images), 0.0, 1.0, encoder_out.out_channels)
        decoder_out = taesd.decoder.layers[-1]
        latents = taesd.encoder(images)
        hidden = taesd.decoder.layers[:-1](torch.tanh(latents / 3) * 3)
        _rescale_output(decoder_out, decoder_out(hidden), 0.5, 0.2, decoder_out.out_channels)
        return
    channels = vae.config.latent_channels
    scale = float(vae.config.scaling_factor)
    quant = vae.quant_conv
    moments = quant(vae.encoder(images)) if quant is not None else vae.encoder(images)
    target = quant if quant is not None else vae.encoder.conv_out
    _rescale_output(target, moments, 0.0, 1.0 / scale, channels)
    latents = vae.encode(images).latent_dist.mode()
    decoder_out = vae.decoder.conv_out
    captured: dict[str, torch.Tensor] = {}
    hook = decoder_out.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
    vae.decode(latents)
    hook.remove()
    _rescale_output(decoder_out, captured["out"], 0.0, 0.4, decoder_out.out_channels)


def build_tiny_models(
    seed: int = 0, vae: str = "taesd", prediction_type: str = "epsilon"
) -> TinyModels:
    """Build the tiny model; same ``seed`` gives the same weights, the global RNG is untouched.

    Each part is seeded on its own, so the UNet and text encoder do not depend on ``vae``.

    Args:
        seed: weight seed.
        vae: ``taesd`` (tiny ``AutoencoderTiny``, scaling 1.0) or ``full`` (tiny
            ``AutoencoderKL``, scaling 0.18215).
        prediction_type: ``epsilon`` or ``v_prediction``, written into the scheduler config.

    Raises:
        ModelLoadError: unknown ``vae`` or ``prediction_type``.
    """
    if vae not in ("taesd", "full"):
        raise ModelLoadError(f"unknown vae {vae!r} for {TINY_MODEL_ID}: use taesd | full.")
    try:
        PredictionType(prediction_type)
    except ValueError as err:
        raise ModelLoadError(
            f"unknown prediction_type {prediction_type!r}: use {allowed(PredictionType)}."
        ) from err
    logger.info("building %s (seed %d, vae %s, %s)", TINY_MODEL_ID, seed, vae, prediction_type)
    unet = _seeded(seed + _SEED_OFFSETS["unet"], lambda: UNet2DConditionModel(**UNET_CONFIG))
    image_vae: AutoencoderTiny | AutoencoderKL
    if vae == "taesd":
        image_vae = _seeded(seed + _SEED_OFFSETS["taesd"], lambda: AutoencoderTiny(**TAESD_CONFIG))
    else:
        image_vae = _seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKL(**VAE_CONFIG))
    _calibrate_vae(image_vae)
    text_encoder = _seeded(
        seed + _SEED_OFFSETS["text_encoder"], lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    )
    return TinyModels(
        unet=unet,
        vae=image_vae,
        text_encoder=text_encoder,
        tokenizer=load_tiny_tokenizer(),
        scheduler_config=tiny_scheduler_config(prediction_type),
        identity={"model": TINY_MODEL_ID, "seed": seed, "vae": vae},
    )
