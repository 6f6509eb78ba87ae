"""Put loaded parts on their device and dtype and read the facts a ModelBundle records."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from engine.models.bundle import ModelBundle
from engine.models.kinds import ModelFamily
from engine.models.scheduler import (
    alphas_cumprod_from_config,
    num_train_timesteps_from_config,
    original_inference_steps_from_config,
    prediction_type_from_config,
)

logger = logging.getLogger(__name__)


def vae_scale_factor_of(vae: Any) -> int:
    """Image pixels per latent pixel: 8 for the SD VAE and TAESD.

    ``AutoencoderKL``: ``2 ** (len(block_out_channels) - 1)``; ``AutoencoderTiny``:
    ``upsampling_scaling_factor ** (len(decoder_block_out_channels) - 1)``.
    """
    config = vae.config
    blocks = getattr(config, "decoder_block_out_channels", None)
    if blocks is not None:
        return int(getattr(config, "upsampling_scaling_factor", 2)) ** (len(blocks) - 1)
    return int(2 ** (len(config.block_out_channels) - 1))


def prepare_module(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``module`` on ``device`` in ``dtype``, in eval mode, without gradients."""
    if getattr(module, "dtype", None) == dtype:
        module.to(device=device)
    else:
        module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def sd_pipeline_parts(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
    family: ModelFamily = ModelFamily.SD,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
) -> dict[str, Any]:
    """Keyword arguments of a diffusers ``StableDiffusion*Pipeline`` (SDXL: ``StableDiffusionXL*``)
    built from loaded parts: an ``LCMScheduler`` from ``scheduler_config``, no safety checker."""
    from diffusers import LCMScheduler

    parts = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": LCMScheduler.from_config(scheduler_config),
    }
    if family is ModelFamily.SDXL:
        return {**parts, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
    return {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _fit_tokenizer(tokenizer: Any, text_encoder: Any) -> None:
    """Cap ``tokenizer.model_max_length`` at the text encoder's positions (77 for CLIP)."""
    limit = int(text_encoder.config.max_position_embeddings)
    if tokenizer.model_max_length > limit:
        logger.info("tokenizer model_max_length %s capped at %d", tokenizer.model_max_length, limit)
        tokenizer.model_max_length = limit


def _vae_dtype(vae: Any, family: ModelFamily, dtype: torch.dtype) -> torch.dtype:
    """float32 for SDXL's full VAE under float16: it overflows there (black frames), as diffusers'
    ``force_upcast`` says; TAESDXL and SD VAEs run in ``dtype``."""
    upcast = bool(getattr(vae.config, "force_upcast", False)) and not hasattr(
        vae.config, "decoder_block_out_channels"
    )
    if family is ModelFamily.SDXL and dtype == torch.float16 and upcast:
        logger.info("the SDXL VAE overflows in float16: it runs in float32 (vae: taesd is faster)")
        return torch.float32
    return dtype


def assemble_bundle(
    *,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
    prediction_type: str,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    identity: dict[str, Any],
    family: ModelFamily = ModelFamily.SD,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
) -> ModelBundle:
    """Move the parts to ``device``/``dtype`` (eval, no grad) and build the ModelBundle.

    Args:
        unet, vae, text_encoder, tokenizer: diffusers/transformers parts.
        scheduler_config: the model's scheduler config (betas, prediction type, LCM steps).
        prediction_type: ``auto`` (read the scheduler config) or an explicit override.
        device, dtype: where the weights go.
        source: a human-readable origin.
        identity: facts that identify the weights (cache keys).
        family: SD, or SDXL with ``text_encoder_2`` and ``tokenizer_2``.
    """
    _fit_tokenizer(tokenizer, text_encoder)
    if family is ModelFamily.SDXL:
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("an SDXL model needs text_encoder_2 and tokenizer_2")
        _fit_tokenizer(tokenizer_2, text_encoder_2)
        text_encoder_2 = prepare_module(text_encoder_2, device, dtype)
    return ModelBundle(
        unet=prepare_module(unet, device, dtype),
        vae=prepare_module(vae, device, _vae_dtype(vae, family, dtype)),
        text_encoder=prepare_module(text_encoder, device, dtype),
        tokenizer=tokenizer,
        alphas_cumprod=alphas_cumprod_from_config(scheduler_config),
        prediction_type=prediction_type_from_config(scheduler_config, prediction_type),
        device=device,
        dtype=dtype,
        vae_scale_factor=vae_scale_factor_of(vae),
        latent_channels=int(vae.config.latent_channels),
        vae_scaling_factor=float(vae.config.scaling_factor),
        num_train_timesteps=num_train_timesteps_from_config(scheduler_config),
        original_inference_steps=original_inference_steps_from_config(scheduler_config),
        source=source,
        identity=identity,
        scheduler_config=dict(scheduler_config),
        family=family,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
