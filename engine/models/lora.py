"""Fuse LCM-LoRA and style LoRAs into a Stable Diffusion pipeline's UNet and text encoder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import huggingface_hub.constants
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from engine.models.errors import ModelLoadError, short_reason
from engine.models.sources import local_path, looks_like_hub_id

logger = logging.getLogger(__name__)

LCM_ADAPTER = "lcm"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LORA_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _adapter_plan(lcm_lora: str | None, loras: Sequence[tuple[str, float]]) -> list[tuple[str, str, float]]:
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


@dataclass(frozen=True)
class LowRank:
    """One LoRA layer: its fused delta is ``scale · scaling · up @ down`` (conv: as peft)."""

    down: torch.Tensor  # lora_A weight: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # lora_B weight: (out, r) or (out, r, 1, 1)
    scaling: float  # alpha / r (peft's ``scaling``)
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        """``scaling · up @ down`` in the weight's layout, float32."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            delta = up @ down
            delta = delta.T if self.fan_in_fan_out else delta
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        else:
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return delta * self.scaling


@dataclass
class LoraFactors:
    """The low-rank factors of one user LoRA, by module name, per component.

    ``unet`` / ``text_encoder`` / ``text_encoder_2`` (SDXL) map a module name (as in
    ``named_modules``) to its factors; the
    fused parameter is ``f"{name}.weight"``. ``unsupported`` names layers that cannot be
    rescaled exactly (DoRA, embeddings): a live rescale is refused when it is not empty.
    """

    source: str
    unet: dict[str, LowRank] = field(default_factory=dict)
    text_encoder: dict[str, LowRank] = field(default_factory=dict)
    text_encoder_2: dict[str, LowRank] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


def _collect_factors(module: Any, adapter: str, into: dict[str, LowRank], bad: list[str]) -> None:
    if module is None:
        return
    for name, layer in module.named_modules():
        lora_a = getattr(layer, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        down: torch.Tensor = getattr(lora_a[adapter], "weight")  # noqa: B009
        up: torch.Tensor = getattr(layer.lora_B[adapter], "weight")  # noqa: B009
        use_dora = bool(getattr(layer, "use_dora", {}).get(adapter, False))
        if use_dora or down.dim() not in (2, 4):
            bad.append(name)
            continue
        into[name] = LowRank(
            down=down.detach().clone(),
            up=up.detach().clone(),
            scaling=float(layer.scaling[adapter]),
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
        )


def capture_factors(pipe: Any, adapter: str, source: str) -> LoraFactors:
    """The factors of a loaded (not yet fused) peft adapter of ``pipe``'s UNet and text encoder(s)."""
    factors = LoraFactors(source=source)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        _collect_factors(
            getattr(pipe, component, None), adapter, getattr(factors, component), factors.unsupported
        )
    return factors


def touched_parameters(factors: Sequence[LoraFactors], component: str = "unet") -> list[str]:
    """Names of the parameters (``named_parameters``) any of ``factors`` changes, sorted."""
    names = {f"{name}.weight" for f in factors for name in getattr(f, component)}
    return sorted(names)


@torch.no_grad()
def rescale_loras(
    module: Any,
    factors: Sequence[LoraFactors],
    old_scales: Sequence[float],
    new_scales: Sequence[float],
    component: str = "unet",
) -> list[str]:
    """Change fused LoRA scales in place: ``W += (new − old) · scaling · B@A`` per LoRA.

    Args:
        module: the UNet (or text encoder with ``component="text_encoder"``) the LoRAs are fused in.
        factors: one per user LoRA, in config order (``ModelBundle.lora_factors``).
        old_scales, new_scales: the fused scales now and the wanted ones (same length as factors).

    Returns:
        The parameter names that changed (sorted).
    """
    if not len(factors) == len(old_scales) == len(new_scales):
        raise ValueError(f"{len(factors)} LoRAs, {len(old_scales)} old and {len(new_scales)} new scales")
    params = dict(module.named_parameters())
    touched: set[str] = set()
    for lora, old, new in zip(factors, old_scales, new_scales, strict=True):
        step = float(new) - float(old)
        if step == 0.0:
            continue
        for name, low in getattr(lora, component).items():
            weight = params[f"{name}.weight"]
            delta = low.delta().to(weight.device) * step
            weight.copy_((weight.float() + delta).to(weight.dtype))
            touched.add(f"{name}.weight")
    return sorted(touched)


def fuse_loras(
    pipe: Any,
    lcm_lora: str | None,
    loras: Sequence[tuple[str, float]],
    *,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    progress: Callable[[str], None] | None = None,
    factors: list[LoraFactors] | None = None,
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
        factors: when given, the low-rank factors of each user LoRA (not the LCM-LoRA) are
            appended, in order, before fusing (for ``rescale_loras``).

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
    if factors is not None:
        factors.extend(capture_factors(pipe, name, source) for name, source, _ in plan if name != LCM_ADAPTER)
    pipe.set_adapters(names, adapter_weights=[scale for _, _, scale in plan])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    logger.info("fused %d LoRA adapter(s): %s", len(names), ", ".join(names))
    return names


def rescale_bundle(models: Any, old_scales: Sequence[float], new_scales: Sequence[float]) -> bool:
    """Move the torch UNet and text encoder of ``models`` (a ``ModelBundle``) to new LoRA scales.

    Also updates the bundle's ``lora_scales`` and the scales in its ``identity`` (the engine
    cache key). Returns whether the text encoder changed (prompts must be encoded again).
    """
    factors = models.lora_factors
    rescale_loras(models.unet, factors, old_scales, new_scales)
    changed_text = rescale_loras(models.text_encoder, factors, old_scales, new_scales, "text_encoder")
    if getattr(models, "text_encoder_2", None) is not None:  # SDXL's second text encoder
        changed_text += rescale_loras(
            models.text_encoder_2, factors, old_scales, new_scales, "text_encoder_2"
        )
    models.lora_scales = list(new_scales)
    loras = models.identity.get("loras")
    if isinstance(loras, list) and len(loras) == len(new_scales):
        models.identity["loras"] = [[entry[0], s] for entry, s in zip(loras, new_scales, strict=True)]
    return bool(changed_text)


@torch.no_grad()
def rescaled_unet_weights(
    models: Any, old_scales: Sequence[float], new_scales: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The UNet weights the LoRAs touch, at ``new_scales``, by torch name; the UNet is not changed.

    For refitting engines before the torch UNet itself moves (``rescale_bundle``).
    """
    factors: Sequence[LoraFactors] = models.lora_factors
    current = dict(models.unet.named_parameters())
    weights = {}
    for name in touched_parameters(factors):
        module_name = name.removesuffix(".weight")
        value = current[name].float()
        for lora, old, new in zip(factors, old_scales, new_scales, strict=True):
            low = lora.unet.get(module_name)
            if low is not None and new != old:
                value = value + (float(new) - float(old)) * low.delta().to(value.device)
        weights[name] = value.to(current[name].dtype)
    return weights


def check_lora_scales(
    factors: Sequence[LoraFactors], configured: Sequence[float], scales: list[float] | None
) -> list[float] | None:
    """The canonical ``/lora_scales`` value for the loaded LoRAs (None: the configured scales).

    Raises:
        ParamError: no LoRAs, another count, or layers that cannot be rescaled live.
    """
    from engine.params import ParamError

    if scales is None and not factors:
        return None  # "the configured scales" of no LoRAs (e.g. a scene): nothing to do
    if not factors:
        raise ParamError("lora_scales", "no model.loras are configured: there is nothing to scale")
    if scales is None:
        return list(configured)
    if len(scales) != len(factors):
        raise ParamError(
            "lora_scales",
            f"{len(scales)} scales given; allowed: exactly {len(factors)} "
            f"(one per model.loras entry, in config order)",
        )
    unsupported = [name for f in factors for name in f.unsupported]
    if unsupported:
        raise ParamError(
            "lora_scales",
            f"these LoRA layers cannot be rescaled live (DoRA or embeddings): {unsupported[:4]}; "
            "set the scales in model.loras and restart",
        )
    return list(scales)
