"""Thumbnails: a small JPEG of any source by name, for the operator page's Sources box.

The source playing now gives the engine's newest input frame (nothing is opened a second time).
Another source is opened by name (``SourceNames.opener``) on a thread of its own, asked for one
frame for up to ``timeout_s``, then closed; the caller waits at most that long (plus the encoding)
and gets ``None`` when no frame came. A name's answer is kept for ``ttl_s`` (a page asking every
two seconds opens each source at most that often); a name is opened by one thread at a time, at
most ``max_opens`` names at once, and at most ``max_pending`` wait for their turn (beyond that the
answer is ``None`` at once). The caller is the preview's HTTP side, on its own executor: never
the frame loop, never the server's event loop.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bridges.base import Frame, FrameSource
from bridges.ratelimit import RateLimitedLog
from engine.runtime.inputs import SourceNames

logger = logging.getLogger(__name__)

THUMBNAIL_WIDTH = 160
JPEG_QUALITY = 75
TIMEOUT_S = 1.0
TTL_S = 2.0
MAX_OPENS = 4
MAX_PENDING = 16
MAX_CACHED = 64
ENCODE_MARGIN_S = 0.5
"""How much longer than ``timeout_s`` a caller waits for an open that runs late (scaling and
encoding the frame it got)."""


def scaled_jpeg(pixels: np.ndarray, width: int = THUMBNAIL_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """RGBA (or RGB) ``(h, w, 4|3)`` uint8 → a JPEG ``width`` pixels wide, the aspect kept.

    PIL here is off the frame path: it runs on the preview's thumbnail threads, for a page that
    asked, on a copy of a frame the loop already handed over."""
    from PIL import Image

    height, original = int(pixels.shape[0]), int(pixels.shape[1])
    size = (width, max(1, round(height * width / max(1, original))))
    image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class _Grab:
    """One open of one source: done once its thread has a JPEG (or ``None``) in ``jpeg``."""

    done: threading.Event = field(default_factory=threading.Event)
    jpeg: bytes | None = None


class Thumbnails:
    """Thumbnails of sources by name (see the module docstring); ``jpeg(name)`` is the call.

    Args:
        source_names: checks names and opens sources (``engine.source_names``).
        live_name: the name of the source playing now (``runtime_state["input_source"]``).
        live_frame: the engine's newest input frame (``Engine.last_input_frame``), ``None`` before one.
    """

    def __init__(
        self,
        source_names: SourceNames,
        live_name: Callable[[], str],
        live_frame: Callable[[], Frame | None],
        width: int = THUMBNAIL_WIDTH,
        timeout_s: float = TIMEOUT_S,
        ttl_s: float = TTL_S,
        max_opens: int = MAX_OPENS,
        max_pending: int = MAX_PENDING,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source_names = source_names
        self._live_name = live_name
        self._live_frame = live_frame
        self.width = width
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self._now = now
        self._lock = threading.Lock()  # guards the cache and the grabs under way
        self._cache: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()
        self._grabs: dict[str, _Grab] = {}
        self._opens = threading.BoundedSemaphore(max_opens)
        self._log = RateLimitedLog(logger, 5.0)
        self.opened = 0  # sources opened so far (tests read it)

    def jpeg(self, name: str) -> bytes | None:
        """A JPEG of ``name`` (``width`` px wide), or ``None`` when it sent no frame in time.

        ``ValueError`` (naming what is allowed) when ``name`` cannot be a source here."""
        opener = self.source_names.opener(name)  # checks the name; opens nothing
        now = self._now()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and now - cached[0] < self.ttl_s:
                return cached[1]
        if name == self._live_name():
            frame = self._live_frame()
            jpeg = None if frame is None else scaled_jpeg(frame.pixels, self.width)
            self._keep(name, jpeg)
            return jpeg
        with self._lock:
            grab = self._grabs.get(name)
            if grab is None:
                if len(self._grabs) >= self.max_pending:
                    return None  # too many under way: ask again later
                grab = self._grabs[name] = _Grab()
                start = True
            else:
                start = False  # one open per name: wait for the one under way
        if start:
            threading.Thread(
                target=self._grab, args=(name, opener, grab), name="latentstage-thumbnail", daemon=True
            ).start()
        grab.done.wait(self.timeout_s + ENCODE_MARGIN_S)
        return grab.jpeg

    def _grab(self, name: str, opener: Callable[[], FrameSource], grab: _Grab) -> None:
        """On its own thread: open ``name`` (in turn: ``max_opens`` at once), take one frame, close."""
        jpeg: bytes | None = None
        try:
            with self._opens:
                started = self._now()
                source: FrameSource | None = None
                try:
                    source = opener()
                    with self._lock:
                        self.opened += 1
                    left = max(0.0, self.timeout_s - (self._now() - started))
                    frame = source.recv(left)
                    if frame is not None:
                        jpeg = scaled_jpeg(frame.pixels, self.width)
                except (RuntimeError, OSError, ValueError) as err:  # BridgeError, BridgeUnavailable too
                    self._log(logging.INFO, "thumbnail", "no thumbnail of %s: %s", name, err)
                finally:
                    if source is not None:
                        try:
                            source.close()
                        except (RuntimeError, OSError) as err:
                            self._log(logging.INFO, "thumbnail-close", "closing %s: %s", name, err)
        finally:
            grab.jpeg = jpeg
            self._keep(name, jpeg)
            with self._lock:
                self._grabs.pop(name, None)
            grab.done.set()

    def _keep(self, name: str, jpeg: bytes | None) -> None:
        with self._lock:
            self._cache[name] = (self._now(), jpeg)
            self._cache.move_to_end(name)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
