"""The backend seam: fixed-shape UNet and VAE calls, tensors in and out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class UNetRunner(Protocol):
    """``(latents (B, C, h, w), timesteps (B,) int64, embeddings (B, L, D)) -> (B, C, h, w)``.

    B is fixed per configuration (n, n + 1 or 2n); the prediction is ε or v as the model's.
    """

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor
    ) -> torch.Tensor: ...


class VaeRunner(Protocol):
    """Encode images ``(1, 3, H, W)`` in [-1, 1] to scaled latents ``(1, C, H/f, W/f)``.

    ``decode`` maps latents back to images in about [-1, 1].
    """

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


UNET_INPUTS = ("latents", "timesteps", "embeddings")
UNET_OUTPUTS = ("prediction",)
VAE_IMAGES, VAE_LATENTS = "images", "latents"
"""IO names of the exported graphs (the VAE encoder maps images → latents, the decoder back);
the runners bind by these names (``GraphIO``)."""


@dataclass(frozen=True)
class GraphIO:
    """Names → static shapes of one exported graph's inputs and outputs, in graph order."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class UNetShape:
    """Everything that fixes the shapes of one exported / built UNet.

    Attributes:
        batch: UNet batch per frame (n, n + 1 or 2n by cfg mode).
        latent_channels, latent_height, latent_width: latent ``(C, h, w)``.
        text_length, text_dim: prompt embeddings ``(L, D)`` (77 and the text encoder width).
        cross_frame_groups: ``(start, stop)`` batch ranges attending to each other (cross-frame
            attention), or ``None`` for plain self-attention.
    """

    batch: int
    latent_channels: int
    latent_height: int
    latent_width: int
    text_length: int = 77
    text_dim: int = 768
    cross_frame_groups: tuple[tuple[int, int], ...] | None = None

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    @property
    def embeddings(self) -> tuple[int, int, int]:
        return (self.batch, self.text_length, self.text_dim)

    @property
    def io(self) -> GraphIO:
        """``latents, timesteps (batch,) int64, embeddings -> prediction`` (shape of latents)."""
        shapes = (self.latents, (self.batch,), self.embeddings)
        return GraphIO(dict(zip(UNET_INPUTS, shapes)), {UNET_OUTPUTS[0]: self.latents})


@dataclass(frozen=True)
class VaeShape:
    """Image ``(1, 3, H, W)`` ↔ latent ``(1, C, H/f, W/f)`` of one exported VAE."""

    height: int
    width: int
    latent_channels: int = 4
    scale_factor: int = 8

    @property
    def image(self) -> tuple[int, int, int, int]:
        return (1, 3, self.height, self.width)

    @property
    def latent(self) -> tuple[int, int, int, int]:
        f = self.scale_factor
        return (1, self.latent_channels, self.height // f, self.width // f)

    @property
    def encoder_io(self) -> GraphIO:
        """``images (1, 3, H, W) -> latents`` of the exported encoder."""
        return GraphIO({VAE_IMAGES: self.image}, {VAE_LATENTS: self.latent})

    @property
    def decoder_io(self) -> GraphIO:
        """``latents -> images (1, 3, H, W)`` of the exported decoder."""
        return GraphIO({VAE_LATENTS: self.latent}, {VAE_IMAGES: self.image})



