"""The backend seam: fixed-shape UNet and VAE calls, tensors in and out."""

from __future__ import annotations

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
