"""ControlNet condition images from frames: Canny edges in torch and monocular depth (Depth Anything)."""

from engine.conditioning.canny import CannyDetector
from engine.conditioning.depth import (
    DEFAULT_DEPTH_ID,
    DEPTH_ACCEPTED,
    TINY_DEPTH_ID,
    DepthEstimator,
    build_tiny_depth_model,
)

__all__ = [
    "DEFAULT_DEPTH_ID",
    "DEPTH_ACCEPTED",
    "TINY_DEPTH_ID",
    "CannyDetector",
    "DepthEstimator",
    "build_tiny_depth_model",
]
