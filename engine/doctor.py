"""`latentstage doctor`: what this machine offers the engine (torch, devices, SDKs)."""

from __future__ import annotations

import importlib
import platform
import sys
from importlib import metadata

import torch

from bridges.base import BRIDGES, unavailable_reason


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tensorrt() -> str:
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        return "not installed (pip install latentstage[tensorrt]; Windows/Linux with CUDA)"
    return str(getattr(module, "__version__", "installed"))


def _midi() -> str:
    mido, rtmidi = _version("mido"), _version("python-rtmidi")
    if "not installed" in (mido, rtmidi):
        return f"mido {mido}, python-rtmidi {rtmidi} (pip install latentstage[midi])"
    return f"mido {mido}, python-rtmidi {rtmidi} (`latentstage midi ports` lists the ports)"


def report() -> str:
    """A plain-text report, one fact a line."""
    lines = [
        f"python        {sys.version.split()[0]} on {platform.system()} {platform.machine()}",
        f"torch         {torch.__version__}",
        f"diffusers     {_version('diffusers')}",
        f"transformers  {_version('transformers')}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(
                f"cuda:{index}        {torch.cuda.get_device_name(index)} "
                f"(compute {major}.{minor}, CUDA {torch.version.cuda})"
            )
    else:
        built = torch.version.cuda or "none (CPU build)"
        lines.append(f"cuda          not available (torch built with CUDA: {built})")
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    lines.append(f"mps           {'available' if has_mps else 'not available'}")
    device = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if mps is not None and mps.is_available() else "cpu")
    )
    lines.append(f"device auto   {device}")
    lines.append(f"tensorrt      {_tensorrt()}")
    lines.append(f"onnxruntime   {_version('onnxruntime')}")
    lines.append(f"midi          {_midi()}")
    for info in BRIDGES.values():
        reason = unavailable_reason(info.name)
        lines.append(f"bridge {info.name:<7} {'ok' if reason is None else reason}")
    return "\n".join(lines)
