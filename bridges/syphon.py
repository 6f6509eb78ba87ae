"""Syphon bridge (macOS): frames from and to Syphon servers via syphon-python's Metal classes."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridges.base import (
    BridgeError,
    Closing,
    Frame,
    FrameCounter,
    PixelFormat,
    check_rgba,
    from_rgba,
    missing_sdk,
    shut_down,
    to_rgba,
)

log = logging.getLogger(__name__)

EXTRA = "syphon"
#: ``MTLPixelFormat`` values of 8-bit textures → their byte order.
MTL_RGBA8_UNORM = 70
MTL_RGBA8_UNORM_SRGB = 71
MTL_BGRA8_UNORM = 80
MTL_BGRA8_UNORM_SRGB = 81
MTL_FORMATS: dict[int, PixelFormat] = {
    MTL_RGBA8_UNORM: PixelFormat.RGBA,
    MTL_RGBA8_UNORM_SRGB: PixelFormat.RGBA,
    MTL_BGRA8_UNORM: PixelFormat.BGRA,
    MTL_BGRA8_UNORM_SRGB: PixelFormat.BGRA,
}
#: Syphon's shared surfaces are BGRA8; a texture in that format is published with a plain blit.
UPLOAD_FORMAT = (PixelFormat.BGRA, MTL_BGRA8_UNORM)
#: How long a source waits for its server to be announced.
FIND_TIMEOUT = 5.0
#: How long each directory query runs the run loop to take in server announcements.
RUN_LOOP_INTERVAL = 0.05
POLL_INTERVAL = 0.002

# Orientation. Metal textures have row 0 at the top, like ``Frame``; a Metal server blits our
# texture into the shared surface as is and a Metal client reads it back the same way, so no
# flip is needed between Metal peers. ``flip=True`` on either side turns a picture that
# arrives upside down (some OpenGL peers); it is applied while converting the pixels (free).

#: Names of the SyphonSinks open in this process: an empty source query never picks them, so
#: "first server found" is never our own output (feedback). Asking for one by name still works.
_OWN_SERVERS: Counter[str] = Counter()
_OWN_LOCK = threading.Lock()


# --- pure helpers (tested without the SDK) ---------------------------------------------------


def server_label(name: str, app_name: str) -> str:
    """How Syphon apps show a server: ``"App - Name"``, or whichever of the two is set."""
    if name and app_name:
        return f"{app_name} - {name}"
    return name or app_name or "(unnamed)"


def match_server(
    query: str, servers: Sequence[tuple[str, str]], exclude: Collection[str] = ()
) -> int | None:
    """Index of the ``(name, app_name)`` server ``query`` means, or ``None`` when none does.

    An empty query takes the first server whose name is not in ``exclude``. Otherwise the
    first rule that matches anything decides: exact name, app name or label; the same ignoring
    case; a case-insensitive substring of the label. Several matches under the deciding rule
    raise ``BridgeError`` listing them.
    """
    query = query.strip()
    if not query:
        return next((i for i, (name, _) in enumerate(servers) if name not in exclude), None)
    folded = query.casefold()

    def keys(i: int) -> tuple[str, str, str]:
        name, app = servers[i]
        return name, app, server_label(name, app)

    rules = (
        lambda i: query in keys(i),
        lambda i: folded in {k.casefold() for k in keys(i)},
        lambda i: folded in keys(i)[2].casefold(),
    )
    for rule in rules:
        hits = [i for i in range(len(servers)) if rule(i)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise BridgeError(
                f"Syphon server name {query!r} is ambiguous; candidates: "
                f"{', '.join(repr(keys(i)[2]) for i in hits)}. Give the full \"App - Name\"."
            )
    return None


def texture_format(mtl_pixel_format: int) -> PixelFormat:
    """Byte order of an 8-bit Metal texture format; ``ValueError`` for anything else."""
    try:
        return MTL_FORMATS[int(mtl_pixel_format)]
    except KeyError:
        raise ValueError(f"Syphon texture has MTLPixelFormat {mtl_pixel_format}; expected "
                         "an 8-bit RGBA/BGRA format") from None


def texture_to_rgba(image: np.ndarray, mtl_pixel_format: int, flip: bool) -> np.ndarray:
    """A texture's ``(h, w, 4)`` bytes → a new contiguous RGBA array (flipped if asked)."""
    rgba = to_rgba(image, texture_format(mtl_pixel_format), flip_vertical=flip)
    if np.shares_memory(rgba, image):
        rgba = rgba.copy()
    return rgba


def upload_pixels(pixels: np.ndarray, flip: bool) -> np.ndarray:
    """RGBA frame pixels → the contiguous BGRA bytes a server texture is filled with."""
    return from_rgba(pixels, UPLOAD_FORMAT[0], flip_vertical=flip)


# --- the SDK layer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sdk:
    syphon: Any  # the syphon package
    images: Any  # syphon.utils.numpy: texture <-> numpy
    raw: Any  # syphon.utils.raw: texture creation
    errors: tuple[type[BaseException], ...]  # what PyObjC raises


def _import_failure(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("syphon", "objc"):
        return "syphon-python is not installed"
    return f"syphon-python failed to load ({exc})"


def _import_sdk() -> _Sdk:
    import objc
    import syphon
    from syphon.utils import numpy as images
    from syphon.utils import raw

    return _Sdk(syphon, images, raw, (objc.error, RuntimeError, ValueError))


def load_syphon(what: str = "the Syphon bridge") -> _Sdk:
    """Import syphon-python on first use; ``BridgeUnavailable`` naming the ``syphon`` extra."""
    if sys.platform != "darwin":
        raise missing_sdk(EXTRA, what, "Syphon needs macOS")
    try:
        return _import_sdk()
    except (ImportError, OSError) as exc:
        raise missing_sdk(EXTRA, what, _import_failure(exc)) from exc


def unavailable_reason() -> str | None:
    """``None`` on macOS with syphon-python importable, else why not."""
    if sys.platform != "darwin":
        return "Syphon needs macOS"
    try:
        _import_sdk()
    except (ImportError, OSError) as exc:
        return _import_failure(exc)
    return None


class SyphonSource(Closing):
    """Frames from a Syphon server, as RGBA.

    ``server`` is the server's name, its app's name or ``"App - Name"`` (exact first, then
    ignoring case, then a unique part); empty takes the first server found that is not one of
    this process's own outputs. Opening waits up to ``find_timeout`` seconds for the server
    and raises ``BridgeError`` (listing the servers seen) when it does not appear; a server
    that goes away raises ``BridgeError`` from ``recv``. Use from one thread.
    """

    def __init__(self, server: str = "", flip: bool = False,
                 find_timeout: float = FIND_TIMEOUT) -> None:
        self.query = server.strip()
        self.flip = bool(flip)
        self._sdk = load_syphon("the Syphon source")
        self._client: Any = None
        self._frames = FrameCounter()
        try:
            description = self._find(find_timeout)
        except BridgeError:
            raise
        except self._sdk.errors as exc:
            raise BridgeError(f"Syphon server directory failed: {exc}") from exc
        self.server = server_label(str(description.name), str(description.app_name))
        try:
            self._client = self._sdk.syphon.SyphonMetalClient(description)
        except self._sdk.errors as exc:
            raise BridgeError(f"could not connect to Syphon server {self.server!r}: {exc}") from exc
        log.info("Syphon source connected to %r", self.server)

    def _find(self, timeout: float) -> Any:
        directory = self._sdk.syphon.SyphonServerDirectory()
        directory.run_loop_interval = RUN_LOOP_INTERVAL
        start = time.monotonic()
        labels: list[str] = []
        while True:
            servers = list(directory.servers)  # runs the run loop for RUN_LOOP_INTERVAL
            pairs = [(str(s.name), str(s.app_name)) for s in servers]
            labels = [server_label(*pair) for pair in pairs]
            with _OWN_LOCK:
                own = set(_OWN_SERVERS)
            index = match_server(self.query, pairs, exclude=own)
            if index is not None:
                return servers[index]
            if time.monotonic() - start >= timeout:
                break
        wanted = repr(self.query) if self.query else "(any)"
        raise BridgeError(f"Syphon server {wanted} not found within {timeout:g} s; servers "
                          f"seen: {', '.join(repr(label) for label in labels) or 'none'}")

    def recv(self, timeout: float) -> Frame | None:
        """The next new frame, or ``None`` after ``timeout`` seconds without one."""
        if self._closed:
            raise BridgeError("Syphon source is closed")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                frame = self._poll()
            except BridgeError:
                raise
            except self._sdk.errors as exc:
                raise BridgeError(f"Syphon receive from {self.server!r} failed: {exc}") from exc
            if frame is not None:
                return frame
            now = time.monotonic()
            if now >= deadline:
                return None
            time.sleep(min(POLL_INTERVAL, deadline - now))

    def _poll(self) -> Frame | None:
        client = self._client
        if not client.is_valid:
            raise BridgeError(f"Syphon server {self.server!r} went away")
        if not client.has_new_frame:
            return None
        texture = client.new_frame_image
        if texture is None:
            return None
        mtl_format = int(texture.pixelFormat())
        texture_format(mtl_format)  # refuse other formats before reading (ValueError)
        image = self._sdk.images.copy_mtl_texture_to_image(texture)
        pixels = texture_to_rgba(image, mtl_format, self.flip)
        return self._frames.frame(pixels)

    def _release(self) -> None:
        """Stop the client."""
        client, self._client = self._client, None
        shut_down(client, "stop", "Syphon client", self._sdk.errors, log)



class SyphonSink(Closing):
    """A Syphon server named ``name`` publishing each frame it is given (Metal, BGRA8).

    The texture is re-created when the frame size changes. ``flip=True`` publishes the
    picture upside down (for clients that expect it). Use from one thread.
    """

    def __init__(self, name: str = "latentstage", flip: bool = False) -> None:
        self.name = name.strip()
        if not self.name:
            raise ValueError("the Syphon server name is empty")
        self.flip = bool(flip)
        self._sdk = load_syphon("the Syphon sink")
        self._texture: Any = None
        self._size: tuple[int, int] | None = None
        try:
            self._server = self._sdk.syphon.SyphonMetalServer(self.name)
        except self._sdk.errors as exc:
            raise BridgeError(f"could not start Syphon server {self.name!r}: {exc}") from exc
        with _OWN_LOCK:
            _OWN_SERVERS[self.name] += 1
        log.info("Syphon server %r started", self.name)

    def send(self, frame: Frame) -> None:
        """Publish one RGBA frame; ``BridgeError`` when Syphon refuses it."""
        if self._closed:
            raise BridgeError("Syphon sink is closed")
        pixels = check_rgba(frame.pixels, "SyphonSink.send")
        data = upload_pixels(pixels, self.flip)
        try:
            if (frame.width, frame.height) != self._size:
                self._texture = self._sdk.raw.create_mtl_texture(
                    self._server.device, frame.width, frame.height, UPLOAD_FORMAT[1])
                self._size = (frame.width, frame.height)
            self._sdk.images.copy_image_to_mtl_texture(data, self._texture)
            self._server.publish_frame_texture(self._texture)
        except self._sdk.errors as exc:
            raise BridgeError(f"Syphon publish as {self.name!r} failed: {exc}") from exc

    def _release(self) -> None:
        """Stop the server."""
        with _OWN_LOCK:
            _OWN_SERVERS[self.name] -= 1
            if _OWN_SERVERS[self.name] <= 0:
                del _OWN_SERVERS[self.name]
        self._texture = None
        shut_down(self._server, "stop", "Syphon server", self._sdk.errors, log)

