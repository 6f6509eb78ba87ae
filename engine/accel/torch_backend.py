"""Eager PyTorch backend: call the diffusers modules directly."""

from __future__ import annotations

from typing import Any

import torch


class TorchUNet:
    """``UNetRunner`` over a diffusers ``UNet2DConditionModel`` (or its ``torch.compile`` wrapper).

    ``replays_graphs``: the module is compiled with ``mode="reduce-overhead"`` and replays CUDA
    graphs, whose output buffers the next replay overwrites; each call then marks a new step
    and hands back a copy (``(B, 4, h, w)``, a few hundred KB), so the stream batch may keep it.
    """

    def __init__(self, unet: Any, replays_graphs: bool = False) -> None:
        self.unet = unet
        self.replays_graphs = replays_graphs

    @torch.inference_mode()
    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor
    ) -> torch.Tensor:
        if self.replays_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.unet(latents, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        return out.clone() if self.replays_graphs else out


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
