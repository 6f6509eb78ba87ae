"""Which backend runs the UNet/VAE and what happens when it cannot start (torch-free)."""

from __future__ import annotations

from enum import Enum


class BackendKind(str, Enum):
    """How the UNet/VAE run: eager torch, ONNX Runtime, or a TensorRT engine."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class FallbackMode(str, Enum):
    """What to do when the chosen backend cannot start: stop, or fall back to torch."""

    ERROR = "error"
    TORCH = "torch"
