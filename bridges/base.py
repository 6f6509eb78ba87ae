"""Frame, the two-method FrameSource / FrameSink protocols, bridge errors and the registry."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np


class PixelFormat(str, Enum):
    """Byte order of a packed 8-bit frame."""

    RGBA = "rgba"
    BGRA = "bgra"
    RGB = "rgb"
    BGR = "bgr"

    @property
    def channels(self) -> int:
        return 4 if self in (PixelFormat.RGBA, PixelFormat.BGRA) else 3


@dataclass(eq=False)
class Frame:
    """One video frame as it travels between bridges and the engine.

    Attributes:
        pixels: ``(height, width, 4)`` uint8 RGBA, C-contiguous, row 0 at the top.
        timestamp: ``time.monotonic()`` when the frame was captured or received; latency is
            measured from here to the sink's send.
        sequence: a counter set by the source (increasing; gaps mean dropped frames).
    """

    pixels: np.ndarray
    timestamp: float = field(default_factory=time.monotonic)
    sequence: int = 0

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        pixel_format: PixelFormat = PixelFormat.RGBA,
        timestamp: float | None = None,
        sequence: int = 0,
        flip_vertical: bool = False,
    ) -> Frame:
        """A frame from any packed 8-bit array, converted to RGBA (copies only when needed)."""
        return cls(
            to_rgba(array, pixel_format, flip_vertical),
            time.monotonic() if timestamp is None else timestamp,
            sequence,
        )


class FrameCounter:
    """Stamps what a receiving source got as its next ``Frame`` (sequence 1, 2, …, received now)."""

    def __init__(self) -> None:
        self.count = 0

    def frame(self, pixels: np.ndarray) -> Frame:
        self.count += 1
        return Frame(pixels, time.monotonic(), self.count)


def check_rgba(
    pixels: np.ndarray,
    who: str,
    size: tuple[int, int] | None = None,
    pixel_format: PixelFormat = PixelFormat.RGBA,
) -> np.ndarray:
    """``pixels`` when they are packed uint8 ``(h, w, 4)`` (``pixel_format``'s channels), else ValueError.

    ``size`` (height, width) pins ``h`` and ``w`` too. The error names ``who``, what came and
    what is allowed, e.g. ``RecordSink.send: expected uint8 RGBA pixels of shape (h, w, 4),
    got float32 (64, 64, 3)``.
    """
    channels = pixel_format.channels
    height, width = size if size is not None else ("h", "w")
    if (
        pixels.dtype != np.uint8
        or pixels.ndim != 3
        or pixels.shape[2] != channels
        or (size is not None and pixels.shape[:2] != size)
    ):
        raise ValueError(
            f"{who}: expected uint8 {pixel_format.name} pixels of shape ({height}, {width}, {channels}), "
            f"got {pixels.dtype} {pixels.shape}"
        )
    return pixels


def to_rgba(array: np.ndarray, pixel_format: PixelFormat, flip_vertical: bool = False) -> np.ndarray:
    """Packed 8-bit ``(h, w, 3|4)`` in ``pixel_format`` → contiguous RGBA ``(h, w, 4)``."""
    check_rgba(array, "to_rgba", pixel_format=pixel_format)
    if flip_vertical:
        array = array[::-1]
    if pixel_format is PixelFormat.RGBA:
        return np.ascontiguousarray(array)
    out = np.empty((*array.shape[:2], 4), dtype=np.uint8)
    order = {PixelFormat.BGRA: (2, 1, 0), PixelFormat.RGB: (0, 1, 2), PixelFormat.BGR: (2, 1, 0)}
    out[..., :3] = array[..., list(order[pixel_format])]
    out[..., 3] = array[..., 3] if pixel_format.channels == 4 else 255
    return out


def from_rgba(rgba: np.ndarray, pixel_format: PixelFormat, flip_vertical: bool = False) -> np.ndarray:
    """Contiguous RGBA ``(h, w, 4)`` → packed ``pixel_format`` (contiguous)."""
    if flip_vertical:
        rgba = rgba[::-1]
    if pixel_format is PixelFormat.RGBA:
        return np.ascontiguousarray(rgba)
    indices = {
        PixelFormat.BGRA: [2, 1, 0, 3],
        PixelFormat.RGB: [0, 1, 2],
        PixelFormat.BGR: [2, 1, 0],
    }[pixel_format]
    return np.ascontiguousarray(rgba[..., indices])


_C = TypeVar("_C", bound="Closing")


class Closing:
    """``close()`` that runs ``_release()`` once (safe twice), and ``with Bridge(...) as b:``.

    ``_closed`` is set before ``_release`` runs, so a failing release is not retried.
    """

    _closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        """Free what the bridge holds (called once, by ``close``)."""
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BridgeError(RuntimeError):
    """A bridge failed while running (peer gone, device lost); the runtime retries."""


class SourceClosed(BridgeError):
    """The source ended for good (e.g. a non-looping file reached its end)."""


class BridgeUnavailable(RuntimeError):
    """A bridge cannot run here: its SDK is missing or the platform is wrong.

    The message names the extra to install, e.g. ``pip install latentstage[ndi]``.
    """


@runtime_checkable
class FrameSource(Protocol):
    """Where frames come from: ``recv`` and ``close``."""

    def recv(self, timeout: float) -> Frame | None:
        """The next frame, or ``None`` when none arrived within ``timeout`` seconds.

        Raises ``BridgeError`` when the source is gone (the runtime reopens it with backoff).
        """
        ...

    def close(self) -> None:
        """Release everything; safe to call twice."""
        ...


@runtime_checkable
class FrameSink(Protocol):
    """Where frames go: ``send`` and ``close``."""

    def send(self, frame: Frame) -> None:
        """Deliver one frame; raises ``BridgeError`` on failure (the runtime retries)."""
        ...

    def close(self) -> None:
        """Release everything; safe to call twice."""
        ...


@dataclass(frozen=True)
class BridgeInfo:
    """A registered bridge: its module and what it offers."""

    name: str
    module: str
    source: str | None
    sink: str | None
    extra: str | None
    summary: str


BRIDGES: dict[str, BridgeInfo] = {
    info.name: info
    for info in (
        BridgeInfo("pattern", "bridges.pattern", "PatternSource", None, None,
                   "moving colour test pattern (built in)"),
        BridgeInfo("video", "bridges.video", "VideoSource", None, "video",
                   "video file input, looping, paced at the file's rate (PyAV)"),
        BridgeInfo("record", "bridges.record", None, "RecordSink", "video",
                   "record the output to a video file (PyAV)"),
        BridgeInfo("shm", "bridges.shm", "ShmSource", "ShmSink", None,
                   "shared-memory frames, tear-free, for local processes"),
        BridgeInfo("ndi", "bridges.ndi", "NdiSource", "NdiSink", "ndi",
                   "NDI video over the network (cyndilib)"),
        BridgeInfo("spout", "bridges.spout", "SpoutSource", "SpoutSink", "spout",
                   "Spout GPU texture sharing, Windows (SpoutGL)"),
        BridgeInfo("syphon", "bridges.syphon", "SyphonSource", "SyphonSink", "syphon",
                   "Syphon GPU texture sharing, macOS (syphon-python)"),
        BridgeInfo("preview", "bridges.preview", None, "PreviewSink", None,
                   "HTTP page on 127.0.0.1 with the live output and stats"),
    )
}


def _info(name: str) -> BridgeInfo:
    try:
        return BRIDGES[name]
    except KeyError:
        raise ValueError(f"unknown bridge {name!r}; known: {', '.join(BRIDGES)}") from None


def unavailable_reason(name: str) -> str | None:
    """Why bridge ``name`` cannot run here (``None`` when it can). Imports its module only."""
    module = importlib.import_module(_info(name).module)
    check: Callable[[], str | None] | None = getattr(module, "unavailable_reason", None)
    return check() if check is not None else None


def open_source(name: str, /, **options: Any) -> FrameSource:
    """Open the source of bridge ``name`` with its options (keyword arguments of its class)."""
    source: FrameSource = _open(name, "source", options)
    return source


def open_sink(name: str, /, **options: Any) -> FrameSink:
    """Open the sink of bridge ``name`` with its options (keyword arguments of its class)."""
    sink: FrameSink = _open(name, "sink", options)
    return sink


def _open(name: str, role: str, options: dict[str, Any]) -> Any:
    """An instance of the ``role`` (``source`` or ``sink``) class of bridge ``name``."""
    info = _info(name)
    class_name: str | None = getattr(info, role)
    if class_name is None:
        raise ValueError(f"bridge {name!r} has no {role}; {role}s: {', '.join(_names(role))}")
    return getattr(importlib.import_module(info.module), class_name)(**options)


def _names(role: str) -> list[str]:
    return [info.name for info in BRIDGES.values() if getattr(info, role)]


def source_names() -> list[str]:
    return _names("source")


def sink_names() -> list[str]:
    return _names("sink")


def shut_down(
    resource: Any,
    method: str,
    what: str,
    errors: tuple[type[BaseException], ...],
    log: logging.Logger,
) -> None:
    """Call ``resource.<method>()`` (none: nothing); an SDK error is logged, never raised.

    For ``close``: ``shut_down(receiver, "disconnect", "NDI receiver", ...)`` logs ``NDI
    receiver did not disconnect cleanly: <error>`` as a warning on ``log``.
    """
    if resource is None:
        return
    try:
        getattr(resource, method)()
    except errors as exc:
        log.warning("%s did not %s cleanly: %s", what, method, exc)


def missing_sdk(extra: str, what: str, reason: str) -> BridgeUnavailable:
    """The one error a bridge raises when its SDK or platform is missing."""
    return BridgeUnavailable(
        f"{what} is not available here: {reason}. Install it with "
        f"`pip install latentstage[{extra}]`."
    )
