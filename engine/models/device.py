"""Turn the configured device and dtype names into a torch device and dtype."""

from __future__ import annotations

import logging

import torch

from engine.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``.

    Args:
        name: ``auto`` (cuda if available, then mps, then cpu), ``cuda``, ``cuda:N``,
            ``mps`` or ``cpu`` (case-insensitive).

    Raises:
        ModelLoadError: the name is unknown or the requested device is not available.
    """
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError as err:
        raise ModelLoadError(
            f"unknown device {name!r}: use auto, cuda, cuda:N, mps or cpu."
        ) from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ModelLoadError(
                f"device {name!r} is not available (this machine has {count} CUDA device(s)); "
                "use device auto or cpu."
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ModelLoadError(
                f"device {name!r} is not available (no Apple MPS backend); use device auto or cpu."
            )
        return device
    raise ModelLoadError(f"unsupported device {name!r}: use auto, cuda, cuda:N, mps or cpu.")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``name`` on ``device``.

    Args:
        name: ``auto`` (float16 on cuda and mps, float32 on cpu), ``float16``, ``bfloat16``
            or ``float32`` (also ``fp16``, ``half``, ``bf16``, ``fp32``).
        device: the device the weights will live on.

    Raises:
        ModelLoadError: the name is unknown.
    """
    key = name.strip().lower()
    if key == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    dtype = _DTYPES.get(key)
    if dtype is None:
        raise ModelLoadError(f"unknown dtype {name!r}: use auto, float16, bfloat16 or float32.")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("dtype float16 on cpu is slow and may be inaccurate; float32 is advised")
    return dtype
