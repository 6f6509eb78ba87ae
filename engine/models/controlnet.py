"""Loading ControlNets: a hub id, a diffusers folder, a single file, or a random one shaped for the UNet."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from safetensors import SafetensorError

from engine.models.errors import ModelLoadError, short_reason
from engine.models.sources import SINGLE_FILE_SUFFIXES, TINY_CONTROLNET_ID, local_path, looks_like_hub_id

logger = logging.getLogger(__name__)

CONTROLNET_ACCEPTED = (
    "Give a hub id (e.g. lllyasviel/control_v11f1p_sd15_depth), a diffusers ControlNet folder, "
    f"a single .safetensors file or {TINY_CONTROLNET_ID}."
)
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


def build_random_controlnet(unet: Any, seed: int = 0) -> Any:
    """A ControlNet with seeded random weights shaped for ``unet`` (``builtin:tiny-controlnet``).

    Built from the UNet's config (``ControlNetModel.from_unet`` without its weights), so it fits
    any builtin model; its zero convolutions (the residual outputs and the condition embedding's
    last layer) get small random weights too, or the residuals would be zero and the image would
    not matter. The global RNG is left as it was. On the CPU in float32, eval mode.
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.data.zero_()
        # the condition embedding (its last layer is a zero conv too): He-normal, no biases, so
        # the image, not the biases, makes what it adds
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                std = math.sqrt(2.0 / conv.weight[0].numel())
                conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
                if conv.bias is not None:
                    conv.bias.data.zero_()
    controlnet.eval().requires_grad_(False)
    return controlnet


def load_controlnet(
    source: str,
    unet: Any,
    device: torch.device,
    dtype: torch.dtype,
    *,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The ``ControlNetModel`` named by ``source``, on ``device`` in ``dtype``, and its identity.

    ``unet`` shapes ``builtin:tiny-controlnet`` and is checked against every ControlNet: its
    blocks must give residuals the UNet can add (same block widths and cross-attention width).

    Raises:
        ModelLoadError: naming ``source`` and what is accepted.
    """
    from diffusers import ControlNetModel

    name = source.strip()
    identity: dict[str, Any] = {"id": name}
    if name == TINY_CONTROLNET_ID:
        identity["seed"] = 0
        model = build_random_controlnet(unet)
    elif name.startswith("builtin:"):
        raise ModelLoadError(f"unknown builtin ControlNet {source!r}. {CONTROLNET_ACCEPTED}")
    else:
        path = local_path(name)
        if not path.exists() and not looks_like_hub_id(name):
            raise ModelLoadError(
                f"ControlNet {source!r} is not an existing file or folder, nor a hub id. "
                + CONTROLNET_ACCEPTED
            )
        try:
            if path.is_file():
                if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                    raise ModelLoadError(
                        f"ControlNet file {source!r} is not a .safetensors/.ckpt file. {CONTROLNET_ACCEPTED}"
                    )
                stat = path.stat()
                identity.update(size=stat.st_size, mtime=int(stat.st_mtime))
                model = ControlNetModel.from_single_file(str(path), torch_dtype=dtype)
            else:
                model = ControlNetModel.from_pretrained(
                    str(path) if path.is_dir() else name,
                    torch_dtype=dtype,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
        except _LOAD_ERRORS as err:
            raise ModelLoadError(
                f"ControlNet {source!r} could not be loaded (offline?): {short_reason(err)}. "
                f"{CONTROLNET_ACCEPTED}"
            ) from err
    check_fits(model, unet, source)
    return placed(model, device, dtype), identity


def placed(controlnet: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``controlnet`` on ``device`` in ``dtype``, eval, no grad (cast only when the dtype differs:
    diffusers warns on every dtype ``to()``)."""
    controlnet.to(device)
    if controlnet.dtype != dtype:
        controlnet.to(dtype)
    return controlnet.eval().requires_grad_(False)


def check_fits(controlnet: Any, unet: Any, source: str) -> None:
    """Refuse a ControlNet whose residuals the UNet cannot add (another model family)."""
    mine, theirs = controlnet.config, unet.config
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
        a, b = mine.get(key), theirs.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (
            list(b) if isinstance(b, (list, tuple)) else b
        ):
            raise ModelLoadError(
                f"ControlNet {source!r} does not fit this model: its {key} is {a}, the UNet's is {b}; "
                "allowed: a ControlNet trained for this model family (SD 1.5 ControlNets for SD 1.5, "
                "SD 2.1 ones for sd-turbo)"
            )
