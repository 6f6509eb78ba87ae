"""The choices of a model request: VAE, prediction type, dtype, ControlNet preprocessor (torch-free)."""

from __future__ import annotations

from enum import Enum


class VaeKind(str, Enum):
    """Which VAE encodes/decodes: the tiny TAESD (fast) or the model's own (full quality)."""

    TAESD = "taesd"
    FULL = "full"


class PredictionSetting(str, Enum):
    """What the UNet predicts; ``auto`` reads it from the scheduler config."""

    AUTO = "auto"
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class DType(str, Enum):
    """Weights/activations dtype; ``auto`` is float16 on CUDA/MPS and float32 on CPU."""

    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class ControlPreprocessor(str, Enum):
    """What turns a frame into a ControlNet's condition image."""

    NONE = "none"  # the frame itself (a depth map or edge pass made elsewhere, e.g. in TouchDesigner)
    CANNY = "canny"  # Canny edges, in torch on the device
    DEPTH = "depth"  # monocular depth from a small model (preprocessor_id)
