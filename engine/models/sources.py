"""Decide what kind of model source a configured model id names."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from engine.models.errors import ModelLoadError

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny", "sd-turbo-shape", "tiny-sdxl", "sdxl-turbo-shape", "shapes")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
BUILTIN_IDS = tuple(BUILTIN_PREFIX + name for name in BUILTIN_NAMES)
TINY_CONTROLNET_ID = BUILTIN_PREFIX + "tiny-controlnet"  # random, shaped for the loaded UNet
TINY_DEPTH_ID = BUILTIN_PREFIX + "tiny-depth"  # a random tiny Depth Anything
DEFAULT_DEPTH_ID = "depth-anything/Depth-Anything-V2-Small-hf"
TINY_IP_ADAPTER_ID = BUILTIN_PREFIX + "tiny-ip-adapter"
ACCEPTED = f"Give a hub id, a diffusers folder, a single .safetensors file or {' / '.join(BUILTIN_IDS)}."

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


class SourceKind(str, Enum):
    """Where model weights come from."""

    BUILTIN = "builtin"
    SINGLE_FILE = "single_file"
    LOCAL_FOLDER = "local_folder"
    HUB_ID = "hub_id"


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the ``org/name`` shape of a Hugging Face hub repository id."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def local_path(name: str) -> Path:
    """``name`` as a path with ``~`` expanded."""
    return Path(name).expanduser()


def builtin_name(model_id: str) -> str:
    """``builtin:tiny`` → ``tiny`` (the key of the builtin's spec)."""
    return model_id.strip().removeprefix(BUILTIN_PREFIX)


def classify_source(model_id: str) -> SourceKind:
    """The kind of source ``model_id`` names.

    ``builtin:tiny`` → BUILTIN; an existing ``.safetensors``/``.ckpt`` file → SINGLE_FILE;
    an existing directory → LOCAL_FOLDER; otherwise an ``org/name`` string → HUB_ID.

    Raises:
        ModelLoadError: an unknown builtin, an existing file of another type, or a string
            that is neither an existing path nor shaped like a hub id.
    """
    name = model_id.strip()
    if name.startswith(BUILTIN_PREFIX):
        if name[len(BUILTIN_PREFIX) :] in BUILTIN_NAMES:
            return SourceKind.BUILTIN
        choices = ", ".join(BUILTIN_IDS)
        raise ModelLoadError(
            f"unknown builtin model {model_id!r}: the builtin models are {choices}."
        )
    if not name:
        raise ModelLoadError(f"no model given. {ACCEPTED}")
    path = local_path(name)
    if path.is_dir():
        return SourceKind.LOCAL_FOLDER
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return SourceKind.SINGLE_FILE
        raise ModelLoadError(
            f"model file {model_id!r} is not a .safetensors or .ckpt checkpoint. {ACCEPTED}"
        )
    if looks_like_hub_id(name):
        return SourceKind.HUB_ID
    raise ModelLoadError(
        f"model {model_id!r} is not an existing file or folder, nor a hub id of the form "
        f"org/name. {ACCEPTED}"
    )
