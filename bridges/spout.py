"""Spout bridge (Windows): frames from and to Spout senders via SpoutGL in a hidden GL context."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import ModuleType
from typing import Any

import numpy as np

from bridges.base import BridgeError, Closing, Frame, FrameCounter, PixelFormat, check_rgba, missing_sdk

log = logging.getLogger(__name__)

EXTRA = "spout"
#: OpenGL pixel formats SpoutGL's receiveImage/sendImage accept (GL_UNSIGNED_BYTE data).
GL_RGB = 0x1907
GL_RGBA = 0x1908
GL_BGR = 0x80E0  # GL_BGR_EXT
GL_BGRA = 0x80E1  # GL_BGRA_EXT
GL_FORMATS: dict[PixelFormat, int] = {
    PixelFormat.RGBA: GL_RGBA,
    PixelFormat.BGRA: GL_BGRA,
    PixelFormat.RGB: GL_RGB,
    PixelFormat.BGR: GL_BGR,
}
#: Spout keeps sender names in ``char[256]``.
MAX_NAME_BYTES = 255
#: TouchDesigner's "Syphon Spout Out" TOP default sender name.
TOUCHDESIGNER_SENDER = "TDSyphonSpoutOut"
#: How long a source waits for its sender to appear (counted from the first ``recv``).
FIND_TIMEOUT = 5.0
#: With Spout frame counting off (a SpoutSettings option) every read looks new; reads are then
#: paced to this rate instead of repeating the same picture at the poll rate.
FALLBACK_FPS = 60.0
POLL_INTERVAL = 0.002
#: What the SDK layer raises: pybind11 maps C++ errors to these.
SDK_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, BufferError)

# Orientation. Spout shares a DirectX texture, whose row 0 is the top of the picture, and the
# GL/DX interop maps it row for row, so receiveImage and sendImage with ``invert=False`` move
# pixel buffers with row 0 at the top — the same as ``Frame``. GL applications (TouchDesigner)
# flip their bottom-up textures when they send, so ``flip`` defaults to False; set it when a
# particular sender arrives upside down. The flip is done by Spout on the GPU (``bInvert``).


# --- pure helpers (tested without the SDK) ---------------------------------------------------


def gl_format(pixel_format: PixelFormat) -> int:
    """The GL enum SpoutGL expects for a packed 8-bit ``pixel_format``."""
    return GL_FORMATS[pixel_format]


def check_name(name: str, *, allow_empty: bool) -> str:
    """A Spout sender name, stripped; ``ValueError`` when too long (or empty unless allowed).

    An empty receiver name means "the active sender" (the one chosen in SpoutSettings).
    """
    name = name.strip()
    if not name and not allow_empty:
        raise ValueError("the Spout sender name is empty")
    if "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"Spout sender name {name[:40]!r}... is longer than "
                         f"{MAX_NAME_BYTES} bytes or contains NUL")
    return name


class ReceiveBuffer:
    """The RGBA array a receiver reads into.

    Re-allocated when the sender's size changes; each new frame hands the filled array to the
    ``Frame`` and starts a fresh one, so frames never share memory and nothing is copied.
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the buffer, ``None`` before the first sender update."""
        return None if self.array is None else (self.array.shape[1], self.array.shape[0])

    def resize(self, width: int, height: int) -> bool:
        """Match the sender's size; True when (re-)allocated. A 0 size drops the buffer."""
        if width <= 0 or height <= 0:
            changed = self.array is not None
            self.array = None
            return changed
        if self.size == (width, height):
            return False
        self.array = np.zeros((height, width, 4), np.uint8)
        return True

    def take(self) -> np.ndarray:
        """The filled array; the buffer continues with a new one of the same size."""
        if self.array is None:
            raise ValueError("no receive buffer yet")
        filled, self.array = self.array, np.empty_like(self.array)
        return filled


class Pacer:
    """Lets at most one read through per ``1 / fps`` seconds (the clock is passed in)."""

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.interval = 1.0 / fps
        self._next = float("-inf")

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


class GLContexts:
    """One hidden OpenGL context per thread, shared by the Spout objects used in that thread.

    SpoutGL's ``createOpenGL`` makes a hidden window and context current in the calling thread
    only when none is current; ``closeOpenGL`` must be called on the object that made it. So
    the first object in a thread creates it, the last one to leave closes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, list[Any]] = {}  # thread id → [creating object, users]

    def acquire(self, spout_object: Any) -> None:
        ident = threading.get_ident()
        with self._lock:
            entry = self._owners.get(ident)
            if entry is not None:
                entry[1] += 1
                return
            if not spout_object.createOpenGL():
                raise BridgeError("Spout could not create an OpenGL context (is a GPU driver "
                                  "with OpenGL installed?)")
            self._owners[ident] = [spout_object, 1]

    def release(self, thread: int) -> None:
        with self._lock:
            entry = self._owners.get(thread)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._owners[thread]
        if thread != threading.get_ident():
            log.warning("Spout bridge closed from another thread than the one that used it; "
                        "its OpenGL context is left to the driver")
            return
        if not entry[0].closeOpenGL():
            log.warning("Spout could not close its OpenGL context cleanly")

    def users(self, thread: int) -> int:
        with self._lock:
            entry = self._owners.get(thread)
            return 0 if entry is None else int(entry[1])


CONTEXTS = GLContexts()


# --- the SDK layer ---------------------------------------------------------------------------


def _import_failure(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "SpoutGL":
        return "SpoutGL is not installed"
    return f"SpoutGL failed to load ({exc})"


def load_spoutgl(what: str = "the Spout bridge") -> ModuleType:
    """Import SpoutGL on first use; ``BridgeUnavailable`` naming the ``spout`` extra if not."""
    if sys.platform != "win32":
        raise missing_sdk(EXTRA, what, "Spout needs Windows")
    try:
        import SpoutGL
    except (ImportError, OSError) as exc:
        raise missing_sdk(EXTRA, what, _import_failure(exc)) from exc
    return SpoutGL


def unavailable_reason() -> str | None:
    """``None`` on Windows with SpoutGL importable, else why not."""
    if sys.platform != "win32":
        return "Spout needs Windows"
    try:
        import SpoutGL  # noqa: F401
    except (ImportError, OSError) as exc:
        return _import_failure(exc)
    return None


class _ThreadBound(Closing):
    """Creates the SDK object in the first thread that uses it and refuses other threads.

    ``_sdk`` names the SpoutGL class, the method that sets its sender name and the one that
    releases it, e.g. ``("SpoutSender", "setSenderName", "releaseSender")``.
    """

    _kind = "Spout bridge"
    _sdk: tuple[str, str, str]

    def __init__(self, spout_name: str) -> None:
        self._spout = load_spoutgl(f"the {self._kind}")
        self._spout_name = spout_name
        self._object: Any = None
        self._thread: int | None = None

    def _make(self) -> Any:
        cls, set_name = self._sdk[:2]
        spout_object = getattr(self._spout, cls)()
        getattr(spout_object, set_name)(self._spout_name)
        return spout_object

    def _bound(self) -> Any:
        if self._closed:
            raise BridgeError(f"{self._kind} is closed")
        if self._object is not None:
            if threading.get_ident() != self._thread:
                raise RuntimeError(f"{self._kind} used from two threads; its OpenGL context "
                                   "belongs to the first, so call it from that thread only")
            return self._object
        spout_object = self._make()
        CONTEXTS.acquire(spout_object)
        self._object, self._thread = spout_object, threading.get_ident()
        return spout_object

    def _release(self) -> None:
        """Release the sender/receiver and the OpenGL context."""
        spout_object, self._object = self._object, None
        if spout_object is None or self._thread is None:
            return
        try:
            getattr(spout_object, self._sdk[2])()
        except SDK_ERRORS as exc:
            log.warning("%s did not release cleanly: %s", self._kind, exc)
        CONTEXTS.release(self._thread)


class SpoutSource(_ThreadBound):
    """Frames from the Spout sender named ``sender`` (empty: the active sender), as RGBA.

    The receiver and its hidden OpenGL context are created on the first ``recv`` in the thread
    that calls it; call ``recv`` and ``close`` from that one thread (the runtime's source
    thread). A sender that does not show up within ``find_timeout`` seconds of the first
    ``recv``, or that closes after frames arrived, raises ``BridgeError`` (the runtime reopens
    with backoff). Rows arrive top-down; ``flip=True`` turns a sender that arrives upside down.
    Only new frames are returned; when Spout's frame counting is switched off (SpoutSettings)
    new and repeated frames look alike, so reads are paced to ``fallback_fps``.
    """

    _kind = "Spout source"
    _sdk = ("SpoutReceiver", "setReceiverName", "releaseReceiver")

    def __init__(self, sender: str = TOUCHDESIGNER_SENDER, flip: bool = False,
                 find_timeout: float = FIND_TIMEOUT, fallback_fps: float = FALLBACK_FPS) -> None:
        self.sender = check_name(sender, allow_empty=True)
        self.flip = bool(flip)
        self.find_timeout = find_timeout
        self._pacer = Pacer(fallback_fps)
        self._counting = True
        self._buffer = ReceiveBuffer()
        self._connected = False
        self._started: float | None = None
        self._frames = FrameCounter()
        super().__init__(self.sender)

    def recv(self, timeout: float) -> Frame | None:
        """The next new frame, or ``None`` after ``timeout`` seconds without one."""
        receiver = self._bound()
        now = time.monotonic()
        if self._started is None:
            self._started = now
        deadline = now + max(0.0, timeout)
        while True:
            try:
                frame = self._poll(receiver)
            except BridgeError:
                raise
            except SDK_ERRORS as exc:
                raise BridgeError(f"Spout receive from {self._label()} failed: {exc}") from exc
            if frame is not None:
                return frame
            now = time.monotonic()
            if not self._connected and now - self._started >= self.find_timeout:
                raise BridgeError(f"Spout sender {self._label()} not found within "
                                  f"{self.find_timeout:g} s")
            if now >= deadline:
                return None
            time.sleep(min(POLL_INTERVAL, deadline - now))

    def _poll(self, receiver: Any) -> Frame | None:
        if not self._counting and not self._pacer.due(time.monotonic()):
            return None
        target = self._buffer.array
        received = bool(receiver.receiveImage(target, GL_RGBA, self.flip, 0))
        if receiver.isUpdated():  # new sender or new size: re-allocate, read on the next call
            width, height = int(receiver.getSenderWidth()), int(receiver.getSenderHeight())
            if self._buffer.resize(width, height):
                log.info("Spout sender %s is %dx%d", self._label(), width, height)
            self._counting = bool(receiver.isFrameCountEnabled())
            if not self._counting:
                log.info("Spout frame counting is off; reading %s at %.0f fps",
                         self._label(), 1.0 / self._pacer.interval)
            self._connected = True
            return None
        if not received:
            if self._connected:
                raise BridgeError(f"Spout sender {self._label()} closed")
            return None
        self._connected = True
        if target is None or not receiver.isFrameNew():
            return None
        return self._frames.frame(self._buffer.take())

    def _label(self) -> str:
        return repr(self.sender) if self.sender else "(active sender)"



class SpoutSink(_ThreadBound):
    """A Spout sender named ``name`` sharing each frame it is given (any size; Spout resizes).

    The sender and its hidden OpenGL context are created on the first ``send`` in the thread
    that calls it; call ``send`` and ``close`` from that one thread (the runtime's sink
    thread). ``flip=True`` sends the picture upside down (for receivers that expect it).
    """

    _kind = "Spout sink"
    _sdk = ("SpoutSender", "setSenderName", "releaseSender")

    def __init__(self, name: str = "latentstage", flip: bool = False) -> None:
        self.name = check_name(name, allow_empty=False)
        self.flip = bool(flip)
        super().__init__(self.name)

    def send(self, frame: Frame) -> None:
        """Share one RGBA frame; ``BridgeError`` when Spout cannot."""
        pixels = check_rgba(frame.pixels, "SpoutSink.send")
        sender = self._bound()
        pixels = np.ascontiguousarray(pixels)
        try:
            sent = sender.sendImage(pixels, frame.width, frame.height, GL_RGBA, self.flip, 0)
            if sent:
                sender.setFrameSync(self.name)  # wakes receivers that wait for frames
        except SDK_ERRORS as exc:
            raise BridgeError(f"Spout send as {self.name!r} failed: {exc}") from exc
        if not sent:
            raise BridgeError(f"Spout could not share the frame as {self.name!r} "
                              "(DirectX 11 or GL/DX interop unavailable?)")

