"""Facts the stream math needs from a diffusers scheduler config: alphas_cumprod and friends."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from engine.models.errors import ModelLoadError
from engine.stream.modes import PredictionType, allowed

SD_NUM_TRAIN_TIMESTEPS = 1000
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_BETA_SCHEDULE = "scaled_linear"
DEFAULT_ORIGINAL_INFERENCE_STEPS = 50


def num_train_timesteps_from_config(scheduler_config: Mapping[str, Any]) -> int:
    """``num_train_timesteps`` of the config (1000 when absent)."""
    return int(scheduler_config.get("num_train_timesteps") or SD_NUM_TRAIN_TIMESTEPS)


def alphas_cumprod_from_config(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """The cumulative product of ``1 - beta`` over the training timesteps.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (SD 1.x
    defaults when absent: 1000, 0.00085, 0.012, ``scaled_linear``) or ``trained_betas``.

    Returns:
        ``(num_train_timesteps,)`` float32 tensor on the CPU, decreasing from about 1.

    Raises:
        ModelLoadError: the beta schedule is neither ``scaled_linear`` nor ``linear``.
    """
    trained = scheduler_config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    else:
        steps = num_train_timesteps_from_config(scheduler_config)
        start = float(scheduler_config.get("beta_start", SD_BETA_START))
        end = float(scheduler_config.get("beta_end", SD_BETA_END))
        schedule = str(scheduler_config.get("beta_schedule", SD_BETA_SCHEDULE))
        if schedule == "scaled_linear":
            betas = (
                torch.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=torch.float64) ** 2
            )
        elif schedule == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        else:
            raise ModelLoadError(
                f"scheduler beta_schedule {schedule!r} is not supported; "
                "use a model whose scheduler has beta_schedule scaled_linear or linear."
            )
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def prediction_type_from_config(
    scheduler_config: Mapping[str, Any], override: str = "auto"
) -> PredictionType:
    """The UNet's prediction type: ``override`` unless it is ``auto``, else the config's.

    Raises:
        ModelLoadError: the override or the config names a prediction type the stream
            math does not support (e.g. ``sample``).
    """
    name = override if override != "auto" else scheduler_config.get("prediction_type") or "epsilon"
    try:
        return PredictionType(name)
    except ValueError as err:
        raise ModelLoadError(
            f"prediction_type {name!r} is not supported: use auto | {allowed(PredictionType)}."
        ) from err


def original_inference_steps_from_config(scheduler_config: Mapping[str, Any]) -> int:
    """``original_inference_steps`` of an LCM scheduler config (50 when absent)."""
    value = scheduler_config.get("original_inference_steps")
    return int(value) if value else DEFAULT_ORIGINAL_INFERENCE_STEPS
