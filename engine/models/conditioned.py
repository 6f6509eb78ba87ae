"""The UNet with SDXL inputs, ControlNets and IP-Adapter as one module: what every backend runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from engine.stream.feature_bank import FeatureLayout, feature_layout


class ConditionedUNet(nn.Module):
    """``UNet(latents, timesteps, embeddings)`` plus the residuals of K ControlNets and IP tokens.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (attention processors already installed:
            cross-frame attention on attn1, ``IpAttnProcessor`` on attn2 with an IP-Adapter).
        controlnets: K diffusers ``ControlNetModel`` s fitting ``unet``; their residuals are summed
            (as diffusers' ``MultiControlNetModel`` does), each scaled per batch row.
        ip_tokens: T, the IP-Adapter image tokens at the end of ``embeddings`` (0: none). The
            ControlNets see the text tokens only, as in diffusers' pipelines.
        added: SDXL: the UNet (and its ControlNets) also take ``text_embeds`` and ``time_ids``
            (``added_cond_kwargs``).
        feature_bank: the UNet's attn1 layers carry ``FeatureBankAttnProcessor`` s (the feature
            cache, ``engine.stream.feature_bank``): the call takes the bank and gives the features.

    ``forward(latents, timesteps, embeddings, *extras, active=None)``:
        latents ``(B, C, h, w)``, timesteps ``(B,)`` int64, embeddings ``(B, L + T, D)``;
        ``extras`` in ``UNetShape.io`` order: with ``added`` first ``text_embeds (B, P)`` and
        ``time_ids (B, 6)``, then ``control_images (K, B, 3, H, W)`` in [0, 1] (H =
        h × VAE factor) and ``control_scales (K, B)`` (a row at 0 adds nothing) when given, then
        ``ip_scale (1,)`` or ``(B,)`` with an IP-Adapter, then with ``feature_bank``
        ``feature_bank (F, B, N)``, ``feature_bias (F,)`` and ``feature_injection (2,)``.
        ``active``: K host-side bools; a ControlNet whose scales are all 0 is not run at all
        (eager torch; exported graphs run every ControlNet and take the scales as inputs);
        ``injecting`` False skips the feature injection likewise (its strength is 0).
    Returns the prediction ``(B, C, h, w)``; with ``feature_bank`` the prediction and this
    call's attn1 features ``(B, N)``.
    """

    def __init__(
        self,
        unet: Any,
        controlnets: Sequence[Any] = (),
        ip_tokens: int = 0,
        added: bool = False,
        feature_bank: bool = False,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.controlnets = nn.ModuleList(controlnets)
        self.ip_tokens = int(ip_tokens)
        self.added = bool(added)
        self.feature_bank = bool(feature_bank)
        self._layouts: dict[tuple[int, int], FeatureLayout] = {}  # by latent size: not per frame

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        *extras: torch.Tensor,
        active: tuple[bool, ...] | None = None,
        injecting: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        control_images = control_scales = ip_scale = None
        bank_inputs: tuple[torch.Tensor, ...] = ()
        if self.feature_bank:
            if len(extras) < 3:
                raise ValueError(
                    "a UNet with a feature cache needs feature_bank, feature_bias, feature_injection"
                )
            extras, bank_inputs = extras[:-3], extras[-3:]
        extra: dict[str, Any] = {}  # only what is there: the plain call stays the plain UNet call
        if self.added:
            if len(extras) < 2:
                raise ValueError("an SDXL UNet needs text_embeds and time_ids (Conditioning)")
            text_embeds, time_ids, *extras_left = extras
            extras = tuple(extras_left)
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        if len(self.controlnets) and len(extras) >= 2:
            control_images, control_scales, *rest = extras
        else:
            rest = list(extras)
        if self.ip_tokens and rest:
            ip_scale = rest[0]
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        if control_images is not None and control_scales is not None:
            text = embeddings[:, : embeddings.shape[1] - self.ip_tokens] if self.ip_tokens else embeddings
            for index, controlnet in enumerate(self.controlnets):
                if active and not active[index]:
                    continue
                blocks, middle = controlnet(
                    latents,
                    timesteps,
                    encoder_hidden_states=text,
                    controlnet_cond=control_images[index],
                    return_dict=False,
                    **extra,
                )
                scale = control_scales[index].to(latents.dtype).view(-1, 1, 1, 1)
                if down is None or mid is None:
                    down, mid = [block * scale for block in blocks], middle * scale
                else:
                    down = [total + block * scale for total, block in zip(down, blocks)]
                    mid = mid + middle * scale
        if down is not None:
            extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        attention: dict[str, Any] = {}
        if ip_scale is not None:
            attention["ip_scale"] = ip_scale
        captured: list[torch.Tensor | None] = []
        if bank_inputs:
            bank, bias, injection = bank_inputs
            size = (int(latents.shape[-2]), int(latents.shape[-1]))
            layout = self._layouts.get(size)
            if layout is None:
                layout = self._layouts[size] = feature_layout(self.unet, *size)
            captured = [None] * len(layout.names)
            attention.update(
                feature_bank=layout.split(bank),
                feature_bias=bias,
                feature_injection=injection if injecting else None,
                captured=captured,
            )
        if attention:
            extra["cross_attention_kwargs"] = attention
        prediction = self.unet(
            latents, timesteps, encoder_hidden_states=embeddings, return_dict=False, **extra
        )[0]
        if not bank_inputs:
            return prediction
        if any(c is None for c in captured):
            raise ValueError("the UNet's attn1 layers do not all carry FeatureBankAttnProcessor")
        return prediction, torch.cat([c for c in captured if c is not None], dim=1)
