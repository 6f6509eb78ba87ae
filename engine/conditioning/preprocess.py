"""The preprocessor a ``model.controlnets`` entry names, as one callable: frame → condition image."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.models.kinds import ControlPreprocessor

Preprocess = Callable[[torch.Tensor], torch.Tensor]
"""``(N, 3, H, W)`` frame in [-1, 1] → ``(N, 3, H, W)`` condition in [0, 1], same device and dtype."""


def as_condition(images: torch.Tensor) -> torch.Tensor:
    """``none``: the frame itself, mapped from [-1, 1] to [0, 1] (a depth or edge pass made upstream)."""
    return ((images + 1.0) * 0.5).clamp_(0.0, 1.0)


def make_preprocessor(
    kind: ControlPreprocessor,
    *,
    low_threshold: float,
    high_threshold: float,
    depth_id: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Preprocess:
    """The preprocessor of ``kind`` (a depth model is loaded here: ``ModelLoadError`` if it cannot be).

    Raises:
        ValueError: Canny thresholds out of ``0 <= low < high <= 1``.
        ModelLoadError: the depth model named by ``depth_id``.
    """
    if kind is ControlPreprocessor.CANNY:
        from engine.conditioning.canny import CannyDetector

        return CannyDetector(low_threshold, high_threshold)
    if kind is ControlPreprocessor.DEPTH:
        from engine.conditioning.depth import DepthEstimator

        return DepthEstimator.load(depth_id, device, dtype)
    return as_condition
