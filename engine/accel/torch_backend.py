"""Eager PyTorch backend: call the diffusers modules directly."""

from __future__ import annotations

from typing import Any

import torch


class TorchUNet:
    """``UNetRunner`` over a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    @torch.inference_mode()
    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]


class TorchVae:
    """``VaeRunner`` over ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL``.

    Latents are multiplied by ``scaling_factor`` after encoding and divided before decoding;
    ``AutoencoderKL`` encodes to its distribution's mode (no per-frame sampling noise).
    """

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images, return_dict=False)[0]
        # AutoencoderTiny gives the latent tensor; AutoencoderKL a distribution: take its mode
        latents = encoded if isinstance(encoded, torch.Tensor) else encoded.mode()
        return latents * self.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
