"""IP-Adapter reference images: files in the presets folder, encoded once off the frame loop, cached."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.params import IMAGE_FILE_TEXT, ParamError


class ImagePrompts:
    """Image tokens ``(1, T, D)`` of reference images named by file name in ``folder``.

    ``tokens(name)`` loads and encodes a file once (cached by name, size and modification time;
    a changed file is encoded again) and is safe from the prompt worker and the frame loop at
    once. Only plain file names inside ``folder`` are read, never a path.
    """

    def __init__(self, adapter: Any, folder: str | Path | None) -> None:
        self.adapter = adapter
        self.folder = None if folder is None else Path(folder)
        self._cache: dict[tuple[str, int, int], torch.Tensor] = {}
        self._lock = threading.Lock()
        self.encodes = 0
        self.live: torch.Tensor | None = None  # tokens of a bridge's newest frame (model.ip_adapter.source)

    def path(self, name: str) -> Path:
        """The file ``name`` in the folder (``ParamError`` when it is not there)."""
        if self.folder is None:
            raise ParamError("ip_adapter_image", "no presets folder to read reference images from")
        path = self.folder / name
        if Path(name).name != name or not path.is_file() or path.resolve().parent != self.folder.resolve():
            raise ParamError(
                "ip_adapter_image", f"{name!r} is not a file in {self.folder}; allowed: {IMAGE_FILE_TEXT}"
            )
        return path

    def reference(self, name: str | None) -> torch.Tensor:
        """The tokens that steer: the file ``name``, else the bridge's newest (``live``), else none."""
        if name is None and self.live is not None:
            return self.live
        return self.tokens(name)

    def tokens(self, name: str | None) -> torch.Tensor:
        """The image tokens of ``name``; ``None``: the tokens of no image (guidance's negative)."""
        if name is None:
            return self.adapter.unconditional_tokens()
        path = self.path(name)
        stat = path.stat()
        key = (name, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != name}
                self._cache[key] = self.adapter.encode_image(_read(path))
                self.encodes += 1
            return self._cache[key]


def _read(path: Path) -> torch.Tensor:
    """An image file as ``(1, 3, H, W)`` in [-1, 1] (off the frame loop: PIL is fine here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as err:
        raise ParamError("ip_adapter_image", f"{path.name!r} is not a readable image ({err})") from err
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0
