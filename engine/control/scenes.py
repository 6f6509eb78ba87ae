"""Scenes: every live parameter saved as YAML in presets/scenes/ and recalled by name."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine import params
from engine.atomicfile import STALE_AFTER_S, atomic_write_text, remove_stale_temporaries
from engine.params import ParamError

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A portable file name: letters, digits, '_' and '-' only (``fullmatch``: no trailing newline)."""
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{device}{digit}" for device in ("COM", "LPT") for digit in "0123456789"]
)
"""Device names Windows reserves in every folder (any case): a file ``nul.yaml`` cannot exist."""
NAME_RULE = (
    "1 to 64 letters, digits, '_' or '-', not a Windows device name "
    "(CON, PRN, AUX, NUL, COM0-9, LPT0-9)"
)
DEFAULT_CROSSFADE_S = 1.0
MAX_SCENE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Scene:
    """A loaded scene: its values, the prompt crossfade and where its load lands (``quantize:`` in
    the file; ``None``: the global ``/quantize``).

    Scenes do not store the input by default (``/preset/save`` leaves it out: recalling a look
    does not change the camera); a scene file that names one (``input: ndi:STAGE (Cam)``, a
    source name) switches the main input with it: ``values["input_source"]``."""

    values: dict[str, Any]
    crossfade_s: float
    quantize: str | None = None


class SceneError(ValueError):
    """A scene that cannot be saved or loaded; the message says why."""


def is_scene_name(name: object) -> bool:
    """Whether ``name`` makes the same valid file name on Windows, macOS and Linux."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None and name.upper() not in WINDOWS_RESERVED


def scene_params() -> list[str]:
    """Parameters a scene stores (every live value except actions and pause)."""
    return [spec.name for spec in params.REGISTRY.values() if spec.in_scene]


def is_scene_temporary_target(target: str) -> bool:
    """Whether a temporary file of ``target`` belongs to a scene save (``NAME.yaml``, or ``NAME`` before)."""
    return is_scene_name(target.removesuffix(".yaml"))


class SceneStore:
    """Reads and writes ``<folder>/<name>.yaml``; names are plain words, never paths."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        if not is_scene_name(name):
            raise SceneError(f"{name!r} is not a scene name; allowed: {NAME_RULE}")
        return self.folder / f"{name}.yaml"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.yaml") if is_scene_name(p.stem))

    def save(self, name: str, values: Mapping[str, Any], crossfade_s: float = DEFAULT_CROSSFADE_S) -> Path:
        """Write the scene atomically (``engine.atomicfile.atomic_write_text``).

        A reader (a ``load``, another engine) sees the old scene or the whole new one, never part
        of it, and once this returns the new scene survives a power cut (POSIX). A kill mid-write
        leaves at most a hidden ``.NAME.yaml.XXXXXXXX.tmp``, removed by ``remove_stale_temporaries``.
        """
        target = self.path(name)
        data = {
            "latentstage_scene": 1,
            "crossfade_seconds": crossfade_s,
            "values": {k: params.to_plain(values[k]) for k in scene_params() if k in values},
        }
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        try:
            atomic_write_text(target, text)
        except OSError as err:
            raise SceneError(f"scene {name!r} could not be saved: {err.strerror}") from err
        logger.info("scene %s saved to %s", name, target)
        return target

    def remove_stale_temporaries(self, older_than_s: float = STALE_AFTER_S) -> int:
        """Delete what interrupted saves left in the folder; the number removed (call it at start).

        Only ``.NAME.yaml.XXXXXXXX.tmp`` (and the older ``.NAME.XXXXXXXX.tmp``) of a valid scene
        name older than ``older_than_s`` go: a younger one may be another engine's save in progress.
        """
        return remove_stale_temporaries(self.folder, is_scene_temporary_target, older_than_s)

    def load(self, name: str) -> tuple[dict[str, Any], float]:
        """Validated values and the crossfade seconds of scene ``name``."""
        scene = self.load_scene(name)
        return scene.values, scene.crossfade_s

    def load_scene(self, name: str) -> Scene:
        """Scene ``name``: validated values, crossfade seconds and its own quantum, if any."""
        path = self.path(name)
        if not path.is_file():
            available = ", ".join(self.names()) or "none"
            raise SceneError(f"scene {name!r} does not exist; available: {available}")
        if path.stat().st_size > MAX_SCENE_BYTES:
            raise SceneError(f"scene {name!r} is larger than {MAX_SCENE_BYTES} bytes")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise SceneError(f"scene {name!r} cannot be read: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
            raise SceneError(f"scene {name!r} has no 'values' mapping")
        allowed = set(scene_params())
        unknown = sorted(set(data["values"]) - allowed)
        if unknown:
            raise SceneError(f"scene {name!r} has unknown parameters {unknown}; allowed: {sorted(allowed)}")
        try:
            values = params.validate_changes(data["values"])
        except ParamError as err:
            raise SceneError(f"scene {name!r}: {err}") from err
        crossfade = data.get("crossfade_seconds", DEFAULT_CROSSFADE_S)
        if isinstance(crossfade, bool) or not isinstance(crossfade, (int, float)) or not 0 <= crossfade <= 60:
            raise SceneError(f"scene {name!r}: crossfade_seconds {crossfade!r}; allowed: 0..60")
        quantum = data.get("quantize")
        quantum = "off" if quantum is False else quantum  # YAML reads a bare off as false
        if quantum is not None and quantum not in params.QUANTA:
            raise SceneError(f"scene {name!r}: quantize {quantum!r}; allowed: {' | '.join(params.QUANTA)}")
        source = data.get("input")
        if source is not None:
            try:
                values["input_source"] = params.REGISTRY["input_source"].coerce(source)
            except ParamError as err:
                problem = str(err).removeprefix("input_source: ")
                raise SceneError(f"scene {name!r}: input: {problem}") from None
        return Scene(values, float(crossfade), quantum)
