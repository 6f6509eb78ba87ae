"""Guidance modes: the UNet batch layout per mode and the residual-noise (R-CFG) algebra."""

from __future__ import annotations

import torch

from engine.stream.attention import batch_groups
from engine.stream.modes import CfgType


def unet_batch_size(cfg_type: CfgType, n: int) -> int:
    """UNet batch per frame: n (none, self), n + 1 (onetime), 2n (full)."""
    return {CfgType.NONE: n, CfgType.SELF: n, CfgType.ONETIME: n + 1, CfgType.FULL: 2 * n}[cfg_type]


def batch_groups_for(cfg_type: CfgType, n: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` ranges of the UNet batch that belong together (for cross-frame attention).

    full: the unconditional and the conditional halves; onetime: the negative element alone,
    then the stream batch; none/self: the whole stream batch.
    """
    sizes = {CfgType.FULL: (n, n), CfgType.ONETIME: (1, n)}.get(cfg_type, (n,))
    return batch_groups(sizes)


def expand_for_unet(cfg_type: CfgType, x: torch.Tensor) -> torch.Tensor:
    """Lay the ``(n, ...)`` stream batch out for one UNet call.

    full: ``[x ; x]`` (unconditional half first); onetime: ``[x_0 ; x]`` (the newest latent
    once more, for the negative prompt); none/self: ``x``.
    """
    if cfg_type is CfgType.FULL:
        return torch.cat([x, x], dim=0)
    if cfg_type is CfgType.ONETIME:
        return torch.cat([x[:1], x], dim=0)
    return x


def layout_embeddings(
    cfg_type: CfgType, n: int, positive: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """Prompt embeddings ``(B_unet, L, D)`` matching ``expand_for_unet`` (built per change)."""
    pos = positive.expand(n, -1, -1)
    if cfg_type is CfgType.FULL:
        return torch.cat([negative.expand(n, -1, -1), pos], dim=0).contiguous()
    if cfg_type is CfgType.ONETIME:
        return torch.cat([negative[:1], pos], dim=0).contiguous()
    return pos.contiguous()


def split_prediction(
    cfg_type: CfgType, eps: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split the UNet output into (conditional ``(n, ...)``, unconditional part or ``None``).

    The unconditional part is ``(n, ...)`` for full and ``(1, ...)`` for onetime.
    """
    if cfg_type is CfgType.FULL:
        return eps[n:], eps[:n]
    if cfg_type is CfgType.ONETIME:
        return eps[1:], eps[:1]
    return eps, None


def guide(
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """``ε = ε_u + γ (ε_c − ε_u)`` when γ > 1 and an unconditional prediction exists.

    For R-CFG pass ``eps_uncond = δ S`` (the scaled residual noise): that is the paper's
    ``ε_cfg = δ ε̄ + γ (ε_c − δ ε̄)``. With γ ≤ 1 guidance is off and ``ε = ε_c``.
    """
    if eps_uncond is None or guidance_scale <= 1.0:
        return eps_cond
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def successor_coefficients(
    alpha: torch.Tensor, beta: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot constants of the successor slot, computed once per schedule/noise change.

    Returns ``(a_{i+1} / b_{i+1}, n_{i+1})`` for i = 0..n−1, shapes ``(n, 1, 1, 1)`` and
    ``(n, C, h, w)``; the last slot has no successor and gets ratio 1 and noise ``n_0``
    (its value is discarded).
    """
    one = torch.ones_like(alpha[:1])
    ratio = torch.cat([alpha[1:] / beta[1:], one], dim=0)
    return ratio, torch.roll(noise, shifts=-1, dims=0).contiguous()


def next_residual_noise(
    stock: torch.Tensor,
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    ratio_next: torch.Tensor,
    noise_next: torch.Tensor | None,
) -> torch.Tensor:
    """Residual noise of every slot's successor, so R-CFG needs no extra UNet call.

    Derivation (paper eqs. for R-CFG and the stream batch). Let ``r`` be the reference latent
    of a frame: its input latent ``z`` for self-negative R-CFG. The paper's virtual residual
    noise of slot i is

        S_i = (x_i − a_i r) / b_i                      (a = sqrt(ᾱ_t), b = sqrt(1 − ᾱ_t))

    Slot 0 is built as ``x_0 = a_0 z + b_0 n_0``, so ``S_0 = n_0`` exactly. The step turns slot
    i into ``x0_i`` and the buffer re-noises it for slot i + 1:
    ``x_{i+1} = a_{i+1} x0_i + b_{i+1} n_{i+1}`` (the noise term only when add_noise is on).
    Substituting, and eliminating ``r = (x_i − b_i S_i) / a_i`` with the invariant above:

        S_{i+1} = [n_{i+1}] + (a_{i+1} / b_{i+1}) · (x0_i − (x_i − b_i S_i) / a_i)

    which is exact (no approximation of c_skip/c_out) and keeps the invariant by induction.
    For onetime-negative R-CFG, slot 0's residual is the negative prompt's prediction
    ``ε_neg``; the same update then carries ``r = (x_0 − b_0 ε_neg) / a_0`` — the x0 that the
    negative prompt predicts — through later slots.

    Args:
        stock: ``(n, C, h, w)`` residual noise ``S`` used for this step.
        x: ``(n, C, h, w)`` latents fed to the UNet; x0: their predicted clean latents.
        alpha, beta: ``(n, 1, 1, 1)`` per-slot ``a_i``, ``b_i``.
        ratio_next, noise_next: from ``successor_coefficients``; ``noise_next`` is ``None``
            when add_noise is off.

    Returns:
        ``(n, C, h, w)``: entry i is ``S_{i+1}``; the last entry has no successor (discarded).
    """
    residual = ratio_next * (x0 - (x - beta * stock) / alpha)
    return residual if noise_next is None else residual + noise_next
