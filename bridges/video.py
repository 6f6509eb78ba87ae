"""Video file input via PyAV: background decoding, RGBA frames paced at the file's rate, looping."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from bridges.base import BridgeError, BridgeUnavailable, Closing, Frame, SourceClosed, missing_sdk

if TYPE_CHECKING:
    from av.container import InputContainer

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
_MAX_FPS = 1000.0


def load_av(what: str = "the video bridge") -> ModuleType:
    """Import PyAV on first use; ``BridgeUnavailable`` naming the ``video`` extra if missing."""
    try:
        import av
    except ImportError as exc:
        raise missing_sdk("video", what, "PyAV is not installed") from exc
    return av


def unavailable_reason() -> str | None:
    """``None`` when PyAV can be imported, else why not."""
    try:
        load_av()
    except BridgeUnavailable:
        return "PyAV is not installed (pip install latentstage[video])"
    return None


class _End:
    """Queue marker: the file ended and the source does not loop."""


class _Failed:
    """Queue marker: the decoder thread stopped with this error."""

    def __init__(self, error: BridgeError) -> None:
        self.error = error


_Item: TypeAlias = np.ndarray | _End | _Failed


class VideoSource(Closing):
    """Frames of a video file (RGBA), paced at the file's average frame rate.

    A daemon thread decodes a few frames ahead into a small queue; ``recv`` never waits longer
    than its timeout. With ``loop=True`` the file is reopened at its end and plays again;
    with ``loop=False`` ``recv`` raises ``SourceClosed`` after the last frame. A caller that
    falls behind by more than a frame gets every frame (no burst, no skipping): the schedule
    restarts from the late frame.
    """

    def __init__(self, path: str, loop: bool = True, queue_size: int = 4) -> None:
        self._av = load_av("the video bridge")
        self.path = os.fspath(path)
        self.loop = bool(loop)
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if not os.path.isfile(self.path):
            raise BridgeError(f"video file not found: {self.path!r}")
        container = self._open()
        try:
            if not container.streams.video:
                raise BridgeError(f"video file {self.path!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate
            fps = float(rate) if rate else 0.0
            if not (math.isfinite(fps) and 0.0 < fps <= _MAX_FPS):
                log.info("%s: no usable frame rate (%s), playing at %g fps",
                         self.path, rate, DEFAULT_FPS)
                fps = DEFAULT_FPS
            self.fps = fps
            self.width = int(stream.codec_context.width)
            self.height = int(stream.codec_context.height)
        except BridgeError:
            container.close()
            raise
        self._period = 1.0 / self.fps
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._pending: np.ndarray | None = None
        self._failure: BridgeError | None = None
        self._next_due: float | None = None
        self._sequence = 0
        self._thread = threading.Thread(
            target=self._decode_loop, args=(container,), name=f"video-decode:{self.path}",
            daemon=True,
        )
        self._thread.start()
        log.info("opened %s (%dx%d @ %g fps, loop=%s)",
                 self.path, self.width, self.height, self.fps, self.loop)

    def __repr__(self) -> str:
        return f"VideoSource({self.path!r}, loop={self.loop})"

    # -- decoder thread ------------------------------------------------------------------

    def _open(self) -> InputContainer:
        av = self._av
        try:
            container: InputContainer = av.open(self.path, mode="r")
        except (av.error.FFmpegError, OSError) as exc:
            raise BridgeError(f"cannot open video file {self.path!r}: {exc}") from exc
        return container

    def _put(self, item: _Item) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the source is closing."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode_pass(self, container: InputContainer) -> int | None:
        """Decode the whole file once into the queue; the count, or None when told to stop."""
        count = 0
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for video_frame in container.decode(stream):
            rgba = np.ascontiguousarray(video_frame.to_ndarray(format="rgba"))
            if not self._put(rgba):
                return None
            count += 1
        return count

    def _decode_loop(self, container: InputContainer) -> None:
        av = self._av
        finished = False
        try:
            while True:
                try:
                    count = self._decode_pass(container)
                except av.error.FFmpegError as exc:
                    self._put(_Failed(BridgeError(f"decoding {self.path!r} failed: {exc}")))
                    finished = True
                    return
                finally:
                    container.close()
                if count is None:
                    finished = True
                    return
                if count == 0:
                    self._put(_Failed(BridgeError(f"video file {self.path!r} has no frames")))
                    finished = True
                    return
                if not self.loop:
                    self._put(_End())
                    finished = True
                    return
                try:
                    container = self._open()
                except BridgeError as exc:
                    self._put(_Failed(exc))
                    finished = True
                    return
        finally:
            if not finished and not self._stop.is_set():
                # An unexpected exception is propagating (the thread hook logs it): make recv
                # report it instead of waiting for frames that never come.
                self._put(_Failed(BridgeError(f"decoder thread for {self.path!r} crashed")))

    # -- FrameSource ---------------------------------------------------------------------

    def _take(self, deadline: float) -> np.ndarray | None:
        remaining = deadline - time.monotonic()
        try:
            item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, _End):
            self._failure = SourceClosed(f"end of video file {self.path!r}")
            raise self._failure
        if isinstance(item, _Failed):
            self._failure = item.error
            raise self._failure
        return item

    def recv(self, timeout: float) -> Frame | None:
        """The next frame when it is due within ``timeout`` seconds, else ``None``."""
        if self._closed:
            raise SourceClosed(f"video source {self.path!r} is closed")
        if self._failure is not None:
            raise self._failure
        now = time.monotonic()
        deadline = now + (timeout if timeout > 0 else 0.0)
        if self._pending is None:
            self._pending = self._take(deadline)
            if self._pending is None:
                return None
            now = time.monotonic()
        due = now if self._next_due is None else self._next_due
        if due > deadline:
            if deadline > now:
                time.sleep(deadline - now)
            return None
        if due > now:
            time.sleep(due - now)
        now = time.monotonic()
        # On schedule: the next frame is one period after this one's due time (no drift).
        # Late by a period or more: restart the schedule here instead of bursting.
        self._next_due = (due if now - due < self._period else now) + self._period
        pixels, self._pending = self._pending, None
        frame = Frame(pixels, now, self._sequence)
        self._sequence += 1
        return frame

    def _release(self) -> None:
        """Stop decoding and release the file."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=2.0)
        if self._thread.is_alive():
            log.warning("decoder thread for %s did not stop within 2 s", self.path)
        self._pending = None

