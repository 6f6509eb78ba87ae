"""The choices of a model request: family, VAE, prediction type, dtype, preprocessor (torch-free)."""

from __future__ import annotations

from enum import Enum


class ModelFamily(str, Enum):
    """The architecture family: what the UNet is conditioned on besides the text tokens.

    ``sd``: SD 1.x / 2.x (one CLIP text encoder). ``sdxl``: SDXL / SDXL-turbo (two text
    encoders, their hidden states concatenated; pooled text embeddings and ``add_time_ids``).
    """

    SD = "sd"
    SDXL = "sdxl"


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
