"""Timesteps from t_index_list and the per-slot coefficients, precomputed once per change."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def lcm_timesteps(
    num_inference_steps: int,
    original_inference_steps: int = 50,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """The LCM inference schedule, noisiest first, as diffusers' ``LCMScheduler.set_timesteps``.

    With the defaults (50, 50, 1000) this is ``[999, 979, ..., 19]``, so index 32 is
    t = 359 and index 45 is t = 99.
    """
    if not 1 <= num_inference_steps <= original_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, "
            f"original_inference_steps={original_inference_steps}], which must be at most "
            f"num_train_timesteps={num_train_timesteps}"
        )
    k = num_train_timesteps // original_inference_steps
    origin = [(i + 1) * k - 1 for i in range(original_inference_steps)][::-1]
    skipping = len(origin) / num_inference_steps
    return [origin[math.floor(i * skipping)] for i in range(num_inference_steps)]


def boundary_scalings(timestep: int) -> tuple[float, float]:
    """LCM boundary-condition scalings ``(c_skip, c_out)`` at a discrete timestep.

    ``c_skip = σ² / ((s t)² + σ²)``, ``c_out = s t / sqrt((s t)² + σ²)`` with σ = 0.5 and
    timestep scaling s = 10 (diffusers' ``get_scalings_for_boundary_condition_discrete``).
    """
    scaled = timestep * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip, c_out


def strength_to_t_index_list(strength: float, n: int, num_inference_steps: int) -> list[int]:
    """Map one 0..1 knob onto ``n`` strictly increasing indices ending at the last step.

    ``strength`` 1 starts from pure noise (index 0), 0 from the cleanest slots. The first
    index is ``floor((N - 1)(1 - strength))``, clamped so that ``n`` distinct indices fit;
    the rest are spread linearly up to ``N - 1``.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength!r} is out of range; allowed: a number in [0, 1]")
    if not 1 <= n <= num_inference_steps:
        raise ValueError(f"n={n} slots do not fit into {num_inference_steps} inference steps")
    last = num_inference_steps - 1
    first = min(math.floor(last * (1.0 - strength)), last - (n - 1))
    if n == 1:
        return [first]
    interval = (last - first) / (n - 1)
    indices = [first + math.floor(i * interval) for i in range(n - 1)] + [last]
    for i in range(1, n):  # floor() can collide when the span is tight: push up by one
        indices[i] = max(indices[i], indices[i - 1] + 1)
    return indices


@dataclass(frozen=True)
class StreamSchedule:
    """Per-slot constants of one t_index_list, shaped ``(n, 1, 1, 1)`` for broadcasting.

    Attributes:
        t_index_list: indices into the LCM schedule, strictly increasing (noisiest first).
        timesteps: ``(n,)`` int64 UNet timesteps.
        alpha: ``sqrt(alphas_cumprod[t])``; beta: ``sqrt(1 - alphas_cumprod[t])``.
        c_skip, c_out: LCM boundary-condition scalings.
    """

    t_index_list: tuple[int, ...]
    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def n(self) -> int:
        """Number of denoising slots (the stream batch size without guidance)."""
        return len(self.t_index_list)


def build_schedule(
    alphas_cumprod: torch.Tensor,
    t_index_list: Sequence[int],
    num_inference_steps: int = 50,
    original_inference_steps: int = 50,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StreamSchedule:
    """Precompute every per-slot constant for ``t_index_list`` (float64 math, cast once)."""
    indices = [int(i) for i in t_index_list]
    if not indices:
        raise ValueError("t_index_list is empty; allowed: 1 or more strictly increasing indices")
    if any(b <= a for a, b in itertools.pairwise(indices)):
        raise ValueError(f"t_index_list {indices} is not strictly increasing")
    if indices[0] < 0 or indices[-1] >= num_inference_steps:
        raise ValueError(
            f"t_index_list {indices} has an index outside [0, {num_inference_steps - 1}] "
            f"(num_inference_steps={num_inference_steps})"
        )
    schedule = lcm_timesteps(num_inference_steps, original_inference_steps, alphas_cumprod.numel())
    timesteps = [schedule[i] for i in indices]
    cumprod = alphas_cumprod.to(torch.float64)[timesteps]
    scalings = torch.tensor([boundary_scalings(t) for t in timesteps], dtype=torch.float64)

    def column(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, 1, 1, 1).to(device=device, dtype=dtype)

    return StreamSchedule(
        t_index_list=tuple(indices),
        timesteps=torch.tensor(timesteps, dtype=torch.int64, device=device),
        alpha=column(cumprod.sqrt()),
        beta=column((1.0 - cumprod).sqrt()),
        c_skip=column(scalings[:, 0]),
        c_out=column(scalings[:, 1]),
    )
