"""The LCM steps run one after another: the reference the batched stream step must equal."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.stream.batch import StreamBatch
from engine.stream.modes import CfgType

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sequential_reference(
    batch: StreamBatch,
    z: torch.Tensor,
    denoise: Denoiser,
    emb_cond: torch.Tensor,
    emb_uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Run the n LCM steps one after another on one latent ``z``, with the batch's noise.

    ``denoise(latents, timesteps, embeddings)`` predicts ε (a UNet or a stand-in); with full
    CFG and ``guidance > 1`` it runs a second time on ``emb_uncond``. Returns the last x0.
    """
    s = batch.schedule
    x = s.alpha[0] * z + s.beta[0] * batch.noise[0:1]
    for i in range(batch.n):
        t = s.timesteps[i : i + 1]
        eps = denoise(x, t, emb_cond)
        if batch.cfg_type is CfgType.FULL and guidance > 1:
            assert emb_uncond is not None, "full CFG needs the unconditional embeddings"
            eps_u = denoise(x, t, emb_uncond)
            eps = eps_u + guidance * (eps - eps_u)
        x0 = s.c_out[i] * (x - s.beta[i] * eps) / s.alpha[i] + s.c_skip[i] * x
        if i < batch.n - 1:
            x = s.alpha[i + 1] * x0 + (s.beta[i + 1] * batch.noise[i + 1 : i + 2] if batch.add_noise else 0)
    return x0
