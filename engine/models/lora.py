"""Fuse LCM-LoRA and style LoRAs into a Stable Diffusion pipeline's UNet and text encoder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import huggingface_hub.constants
from safetensors import SafetensorError

from engine.models.errors import ModelLoadError, short_reason
from engine.models.sources import local_path, looks_like_hub_id

logger = logging.getLogger(__name__)

LCM_ADAPTER = "lcm"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LORA_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _adapter_plan(
    lcm_lora: str | None, loras: Sequence[tuple[str, float]]
) -> list[tuple[str, str, float]]:
    """``(adapter_name, source, scale)`` for the LCM-LoRA (scale 1.0) then each LoRA."""
    plan = [(LCM_ADAPTER, lcm_lora, 1.0)] if lcm_lora else []
    plan += [(f"lora_{i}", source, float(scale)) for i, (source, scale) in enumerate(loras)]
    return plan


def _load_adapter(
    pipe: Any,
    source: str,
    adapter_name: str,
    cache_dir: str | None,
    local_files_only: bool,
) -> None:
    """Load one LoRA as a named peft adapter, mapping every failure to ModelLoadError."""
    path = local_path(source)
    kwargs: dict[str, Any] = {"adapter_name": adapter_name}
    if path.is_file():
        target = str(path.parent)
        kwargs["weight_name"] = path.name
    elif path.is_dir():
        target = str(path)
    elif looks_like_hub_id(source):
        target = source
        kwargs.update(cache_dir=cache_dir, local_files_only=local_files_only)
        if local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE:
            # offline, diffusers cannot list the repo to guess the file name
            kwargs["weight_name"] = LORA_WEIGHT_NAME
    else:
        raise ModelLoadError(
            f"LoRA {source!r} not found: it is not an existing file or folder, nor a hub id "
            "of the form org/name."
        )
    try:
        pipe.load_lora_weights(target, **kwargs)
    except _LORA_ERRORS as err:
        raise ModelLoadError(
            f"LoRA {source!r} could not be loaded: {short_reason(err)}. Give a LoRA .safetensors "
            "file, a folder holding pytorch_lora_weights.safetensors, or a (cached) hub id."
        ) from err


def fuse_loras(
    pipe: Any,
    lcm_lora: str | None,
    loras: Sequence[tuple[str, float]],
    *,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Fuse the LCM-LoRA (at scale 1.0) and each ``(source, scale)`` LoRA into plain weights.

    Uses diffusers' ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora`` +
    ``unload_lora_weights``: afterwards ``W' = W + Σ scale·(alpha/r)·B@A`` and the UNet and
    text encoder hold plain ``nn.Linear``/``nn.Conv2d`` modules again, no peft layers.

    Args:
        pipe: a diffusers pipeline with the SD LoRA loader mixin (``StableDiffusionPipeline``).
        lcm_lora: LCM-LoRA source (file, folder or hub id) or None.
        loras: ``(source, scale)`` pairs.
        cache_dir, local_files_only: passed to the hub for hub ids.
        progress: called with a short line per LoRA.

    Returns:
        The adapter names fused (empty when there was nothing to fuse).

    Raises:
        ModelLoadError: a LoRA cannot be found or loaded; the message names it.
    """
    plan = _adapter_plan(lcm_lora, loras)
    if not plan:
        return []
    for adapter_name, source, scale in plan:
        line = f"loading LoRA {source} (scale {scale:g})"
        logger.info(line)
        if progress is not None:
            progress(line)
        _load_adapter(pipe, source, adapter_name, cache_dir, local_files_only)
    names = [name for name, _, _ in plan]
    pipe.set_adapters(names, adapter_weights=[scale for _, _, scale in plan])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    logger.info("fused %d LoRA adapter(s): %s", len(names), ", ".join(names))
    return names
