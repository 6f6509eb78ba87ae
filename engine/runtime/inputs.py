"""Source names (``pattern``, ``ndi:NAME``, ``shm:NAME``, ``file:NAME``...) to bridge openers, and back.

The names are what ``/input/sources`` lists and ``/input/select`` takes
(``bridges.discovery.parse_source_name`` checks them). A name is turned into an
``input`` config section checked by the config schema (so a switched-to source gets the same
defaults and checks as one configured at start) and then into the bridge's opener. ``file:NAME``
is a video file by name inside the media folder, never a path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from bridges.base import FrameSource, open_source
from bridges.discovery import media_path, parse_source_name
from engine.config.schema import InputSettings

_INPUT = TypeAdapter(InputSettings)
RUNTIME_INPUT_KEYS = {"type", "on_loss", "retry_seconds", "stall_seconds"}
"""Keys of the ``input`` section that the runtime uses; the rest go to the bridge."""


def source_spec(input_config: Any) -> tuple[str, dict[str, Any]]:
    """Bridge name and constructor options from a validated ``input`` config section."""
    options = input_config.model_dump(mode="json", exclude=RUNTIME_INPUT_KEYS)
    return input_config.type, options


class SourceNames:
    """Opens sources by name: ``opener(name)`` (a ValueError when the name cannot be a source
    here), ``name_of(section)`` (the name of a configured ``input`` section).

    Args:
        media_dir: where ``file:NAME`` looks.
        base: the configured ``input`` section; a switched-to pattern keeps its size and rate,
            every source its loss handling.
    """

    def __init__(self, media_dir: str | os.PathLike[str], base: Any = None) -> None:
        self.media_dir = Path(media_dir)
        self.base = base

    def section(self, name: str) -> Any:
        """The checked ``input`` config section that ``name`` means."""
        source_kind, value = parse_source_name(name)
        kind = source_kind.value
        data: dict[str, Any] = {"type": kind}
        if kind == "pattern" and self.base is not None and self.base.type == "pattern":
            data.update(fps=self.base.fps, width=self.base.width, height=self.base.height)
        elif kind == "ndi":
            data["source"] = value
        elif kind == "spout":
            data["sender"] = value
        elif kind == "syphon":
            data["server"] = value
        elif kind == "shm":
            data["name"] = value
        elif kind == "file":
            path = media_path(self.media_dir, value)
            if not path.is_file():
                raise ValueError(f"{name!r:.80}: no such video file in the media folder {self.media_dir}")
            data.update(type="video", path=str(path))
        if self.base is not None:
            data.update(
                on_loss=self.base.on_loss.value if hasattr(self.base.on_loss, "value") else self.base.on_loss,
                retry_seconds=self.base.retry_seconds,
                stall_seconds=self.base.stall_seconds,
            )
        try:
            return _INPUT.validate_python(data)
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(part) for part in problem["loc"][1:])
            raise ValueError(f"{name!r:.80}: {where} {problem['msg']}") from None

    def opener(self, name: str) -> Callable[[], FrameSource]:
        """What opens the source ``name`` (it opens nothing now)."""
        bridge, options = source_spec(self.section(name))
        return lambda: open_source(bridge, **options)

    def name_of(self, section: Any) -> str:
        """The source name of a configured ``input`` section (a video outside the media folder
        keeps its file name: it is shown, not re-opened by it)."""
        kind = section.type
        if kind == "pattern":
            return "pattern"
        if kind == "video":
            return f"file:{Path(section.path).name}"
        value = {"ndi": "source", "spout": "sender", "syphon": "server", "shm": "name"}[kind]
        return f"{kind}:{getattr(section, value)}"
