"""Eager PyTorch backend: call the diffusers modules directly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.accel.base import Conditioning
from engine.models.conditioned import ConditionedUNet


class TorchUNet:
    """``UNetRunner`` over a diffusers ``UNet2DConditionModel`` (or its ``torch.compile`` wrapper).

    ``replays_graphs``: the module is compiled with ``mode="reduce-overhead"`` and replays CUDA
    graphs, whose output buffers the next replay overwrites; each call then marks a new step
    and hands back a copy (``(B, 4, h, w)``, a few hundred KB), so the stream batch may keep it.
    """

    def __init__(
        self,
        unet: Any,
        replays_graphs: bool = False,
        controlnets: Sequence[Any] = (),
        ip_tokens: int = 0,
        added: bool = False,
    ) -> None:
        self.unet = unet
        self.replays_graphs = replays_graphs
        self.conditioned = ConditionedUNet(unet, controlnets, ip_tokens, added)
        self.banked = ConditionedUNet(unet, controlnets, ip_tokens, added, feature_bank=True)

    @classmethod
    def of(cls, models: Any, unet: Any = None, replays_graphs: bool = False) -> TorchUNet:
        """The runner of a ``ModelBundle``'s UNet with everything it is conditioned on: SDXL's added
        inputs, the ControlNets, the IP-Adapter (``unet``: another module for it, e.g. compiled)."""
        return cls(
            models.unet if unet is None else unet,
            replays_graphs,
            controlnets=models.controlnets,
            ip_tokens=models.ip_tokens,
            added=models.pooled_dim > 0,
        )

    @torch.inference_mode()
    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        if self.replays_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        extras: list[torch.Tensor] = []
        active = None
        if conditioning is not None:
            if conditioning.text_embeds is not None and conditioning.time_ids is not None:
                extras += [conditioning.text_embeds, conditioning.time_ids]
            if conditioning.control_images is not None and conditioning.control_scales is not None:
                extras += [conditioning.control_images, conditioning.control_scales]
            if conditioning.ip_scale is not None:
                extras.append(conditioning.ip_scale)
            active = conditioning.active
            if conditioning.feature_bank is not None:
                assert conditioning.feature_bias is not None and conditioning.feature_injection is not None
                extras += [
                    conditioning.feature_bank,
                    conditioning.feature_bias,
                    conditioning.feature_injection,
                ]
                prediction, features = self.banked(
                    latents, timesteps, embeddings, *extras, active=active, injecting=conditioning.injecting
                )
                if conditioning.feature_out is not None:
                    conditioning.feature_out.append(features.clone() if self.replays_graphs else features)
                return prediction.clone() if self.replays_graphs else prediction
        out = self.conditioned(latents, timesteps, embeddings, *extras, active=active)
        assert isinstance(out, torch.Tensor)
        return out.clone() if self.replays_graphs else out


class TorchVae:
    """``VaeRunner`` over ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL``.

    Latents are multiplied by ``scaling_factor`` after encoding and divided before decoding;
    ``AutoencoderKL`` encodes to its distribution's mode (no per-frame sampling noise). A VAE
    kept in float32 under a float16 pipeline (SDXL's) gets its inputs cast to float32 and
    gives its outputs back in the caller's dtype; where the dtypes match the casts are no-ops.
    """

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.dtype = next(vae.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images.to(self.dtype), return_dict=False)[0]
        # AutoencoderTiny gives the latent tensor; AutoencoderKL a distribution: take its mode
        latents = encoded if isinstance(encoded, torch.Tensor) else encoded.mode()
        return (latents * self.scaling_factor).to(images.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype), return_dict=False)[0]
        return images.to(latents.dtype)
