"""Enumerations shared by the stream math, the configuration and the live parameters."""

from __future__ import annotations

from enum import Enum


class CfgType(str, Enum):
    """Classifier-free guidance mode; decides the UNet batch per frame.

    ``none``: n, ``self`` (self-negative R-CFG): n, ``onetime`` (onetime-negative
    R-CFG): n + 1, ``full`` (conventional CFG): 2n.
    """

    NONE = "none"
    FULL = "full"
    SELF = "self"
    ONETIME = "onetime"


class BlendMethod(str, Enum):
    """How weighted prompt embeddings or seed noises are combined."""

    LINEAR = "linear"
    SLERP = "slerp"


class PredictionType(str, Enum):
    """What the UNet predicts: the added noise or the velocity ``v``."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class GenerationMode(str, Enum):
    """Image-to-image on incoming frames, or text-to-image from noise."""

    IMG2IMG = "img2img"
    TXT2IMG = "txt2img"


def allowed(enum_cls: type[Enum]) -> str:
    """The allowed values of an enum as ``a | b | c``, for error messages."""
    return " | ".join(str(member.value) for member in enum_cls)
