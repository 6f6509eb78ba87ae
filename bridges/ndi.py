"""NDI over cyndilib: find a sender by name, receive video (RGBA) or audio via frame sync, send RGBA."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from types import ModuleType
from typing import Any

import numpy as np

from bridges.base import (
    BridgeError,
    Closing,
    Frame,
    FrameCounter,
    PixelFormat,
    check_rgba,
    missing_sdk,
    shut_down,
)

log = logging.getLogger(__name__)

EXTRA = "ndi"
#: Name this process's receivers show to NDI senders (in their connection lists).
RECEIVER_NAME = "latentstage"
#: How long opening a source waits for the sender to be discovered.
FIND_TIMEOUT = 5.0
#: After a non-exact name match, how long discovery keeps listening for an exact one.
SETTLE_TIME = 0.5
#: How long a receiver may take to connect to a found source.
CONNECT_TIMEOUT = 5.0
#: How long a connection may be gone before ``recv`` reports the source as lost.
LOST_AFTER = 3.0
#: Sleep between frame-sync polls while waiting in ``recv``.
POLL_INTERVAL = 0.002
#: How often ``recv`` asks the receiver whether it is still connected.
CONNECTION_CHECK_INTERVAL = 0.25
DEFAULT_FPS = 30.0
MAX_FPS = 1000.0
#: What an NDI audio source asks NDI's frame sync to deliver (it converts any other format).
AUDIO_SAMPLE_RATE = 48000
AUDIO_CHANNELS = 2
#: What cyndilib raises when the SDK fails.
SDK_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError)

#: Packed 8-bit layouts a receiver set to ``RGBX_RGBA`` (or ``BGRX_BGRA``) delivers:
#: FourCC name → (byte order, alpha channel is padding and must read as opaque).
FOURCC_LAYOUTS: dict[str, tuple[PixelFormat, bool]] = {
    "RGBA": (PixelFormat.RGBA, False),
    "RGBX": (PixelFormat.RGBA, True),
    "BGRA": (PixelFormat.BGRA, False),
    "BGRX": (PixelFormat.BGRA, True),
}


# --- pure helpers (tested without the SDK) ---------------------------------------------------


def split_source_name(name: str) -> tuple[str, str]:
    """``"HOST (Stream)"`` → ``("HOST", "Stream")``; a name without parentheses → ``(name, "")``."""
    host, sep, rest = name.partition("(")
    if not sep:
        return name.strip(), ""
    stream = rest[:-1] if rest.endswith(")") else rest
    return host.strip(), stream.strip()


def match_source(query: str, names: list[str]) -> tuple[str | None, bool]:
    """Pick the NDI source ``query`` means among ``names``: ``(name or None, exact)``.

    In order, the first rule that matches anything decides:

    1. the exact full name (``"HOST (TouchDesigner)"``) — ``exact`` is True;
    2. case-insensitive equality with the full name or with the stream part in parentheses;
    3. a case-insensitive substring of the full name (which covers the stream part).

    More than one match under the deciding rule raises ``BridgeError`` listing the candidates.
    """
    query = query.strip()
    if not query:
        raise ValueError("the NDI source name is empty")
    unique = list(dict.fromkeys(names))
    if query in unique:
        return query, True
    folded = query.casefold()
    rules = (
        lambda n: folded in (n.casefold(), split_source_name(n)[1].casefold()),
        lambda n: folded in n.casefold(),
    )
    for rule in rules:
        hits = [n for n in unique if rule(n)]
        if len(hits) == 1:
            return hits[0], False
        if hits:
            raise BridgeError(
                f"NDI source name {query!r} is ambiguous; candidates: "
                f"{', '.join(repr(h) for h in hits)}. Give the full name."
            )
    return None, False


def fourcc_layout(fourcc: str) -> tuple[PixelFormat, bool]:
    """Byte order and "alpha is padding" for a received FourCC name; ``ValueError`` otherwise."""
    try:
        return FOURCC_LAYOUTS[fourcc]
    except KeyError:
        raise ValueError(
            f"NDI delivered {fourcc} frames; expected one of {', '.join(FOURCC_LAYOUTS)}"
        ) from None


def packed_rows(data: np.ndarray, width: int, height: int, stride: int) -> np.ndarray:
    """View a flat 4-byte-per-pixel buffer with ``stride`` bytes per row as ``(height, width, 4)``.

    ``stride`` 0 means packed rows (``width * 4``); a longer stride skips each row's padding.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size {width}x{height} is empty")
    stride = stride or width * 4
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"expected a flat uint8 buffer, got {data.dtype} {data.shape}")
    if stride < width * 4 or data.size < stride * (height - 1) + width * 4:
        raise ValueError(
            f"buffer of {data.size} bytes cannot hold {width}x{height} pixels at stride {stride}"
        )
    return np.lib.stride_tricks.as_strided(
        data, shape=(height, width, 4), strides=(stride, 4, 1), writeable=False
    )


def received_to_rgba(
    data: np.ndarray, width: int, height: int, stride: int, fourcc: str
) -> np.ndarray:
    """A received flat buffer → a new contiguous RGBA ``(height, width, 4)`` array.

    BGR(A/X) is reordered; the padding byte of RGBX/BGRX reads as opaque (255).
    """
    pixel_format, opaque = fourcc_layout(fourcc)
    rows = packed_rows(data, width, height, stride)
    rgba = np.empty((height, width, 4), np.uint8)
    if pixel_format is PixelFormat.RGBA:
        rgba[...] = rows
    else:
        rgba[..., :3] = rows[..., 2::-1]
        rgba[..., 3] = rows[..., 3]
    if opaque:
        rgba[..., 3] = 255
    return rgba


def send_fourcc(alpha: bool) -> str:
    """FourCC name a sink sends RGBA frames as: with alpha, or with the alpha byte as padding."""
    return "RGBA" if alpha else "RGBX"


def send_size(width: int, height: int) -> tuple[int, int]:
    """NDI video has even dimensions (odd ones are cropped by the SDK); the size sent."""
    even = (width - width % 2, height - height % 2)
    if even[0] < 2 or even[1] < 2:
        raise ValueError(f"frame of {width}x{height} is too small for NDI (at least 2x2)")
    return even


def frame_rate(fps: float) -> Fraction:
    """The frame rate advertised to receivers; NTSC rates (29.97, 59.94, 23.976) as n/1001."""
    if not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {fps}")
    ntsc = round(fps * 1.001)
    if fps != round(fps) and abs(fps * 1.001 - ntsc) < 1e-3:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1000)


def check_sender_name(name: str) -> str:
    """The stripped sender name; ``ValueError`` when empty or containing parentheses.

    NDI shows a sender as ``"HOST (name)"``; parentheses inside ``name`` would make that
    full name ambiguous to parse.
    """
    name = name.strip()
    if not name:
        raise ValueError("the NDI sender name is empty")
    if "(" in name or ")" in name:
        raise ValueError(f"NDI sender name {name!r} must not contain parentheses")
    return name


@dataclass(eq=False)
class ConnectionWatch:
    """When a receiver's connection state means the source is gone (pure, clock passed in).

    Never connecting within ``connect_timeout`` or losing the connection for ``lost_after``
    seconds is an error; a connected sender that sends no frames is not.
    """

    source: str
    opened_at: float
    connect_timeout: float
    lost_after: float
    ever_connected: bool = field(default=False, init=False)
    lost_since: float | None = field(default=None, init=False)

    def connected(self) -> None:
        """A frame arrived or the receiver reports a connection."""
        self.ever_connected = True
        self.lost_since = None

    def update(self, now: float, connected: bool) -> str | None:
        """The error message when the source should be reported lost, else ``None``."""
        if connected:
            self.connected()
            return None
        if not self.ever_connected:
            if now - self.opened_at >= self.connect_timeout:
                return (f"could not connect to NDI source {self.source!r} within "
                        f"{self.connect_timeout:g} s")
            return None
        if self.lost_since is None:
            self.lost_since = now
            return None
        if now - self.lost_since >= self.lost_after:
            return (f"NDI source {self.source!r} disconnected "
                    f"(no connection for {now - self.lost_since:.1f} s)")
        return None


# --- the SDK layer ---------------------------------------------------------------------------


def _import_failure(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "cyndilib":
        return "cyndilib is not installed"
    return f"cyndilib failed to load ({exc})"


def load_cyndilib(what: str = "the NDI bridge") -> ModuleType:
    """Import cyndilib on first use; ``BridgeUnavailable`` naming the ``ndi`` extra if missing."""
    try:
        import cyndilib
    except (ImportError, OSError) as exc:
        raise missing_sdk(EXTRA, what, _import_failure(exc)) from exc
    return cyndilib


def unavailable_reason() -> str | None:
    """``None`` when cyndilib (which bundles the NDI runtime) imports, else why not."""
    try:
        import cyndilib  # noqa: F401
    except (ImportError, OSError) as exc:
        return _import_failure(exc)
    return None


def find_source(finder: Any, query: str, timeout: float) -> str:
    """The full name of the sender ``query`` means (``match_source``), polling ``finder``.

    Waits up to ``timeout`` seconds; after a non-exact match, up to ``SETTLE_TIME`` more for an
    exact one. ``BridgeError`` with the names seen when nothing matches in time.
    """
    start = time.monotonic()
    deadline = start + max(0.0, timeout)
    candidate: str | None = None
    settle_until = 0.0
    names: list[str] = []
    while True:
        names = list(finder.update_sources())
        name, exact = match_source(query, names)
        now = time.monotonic()
        if exact and name is not None:
            return name
        if name is not None:
            if name != candidate:
                candidate, settle_until = name, min(deadline, now + SETTLE_TIME)
            if now >= settle_until:
                return name
        else:
            candidate = None
        if now >= deadline:
            break
        time.sleep(min(0.1, max(0.0, deadline - now)))
    raise BridgeError(
        f"NDI source {query!r} not found within {time.monotonic() - start:.1f} s; "
        f"sources seen: {', '.join(repr(n) for n in names) or 'none'}"
    )


class _Receiving(Closing):
    """What the NDI video and audio sources share: find the sender, connect, watch the link.

    Opening waits up to ``find_timeout`` seconds for the sender to be discovered and raises
    ``BridgeError`` (with the names seen) when it is not. ``_check_connection`` raises
    ``BridgeError`` when the connection never comes up or is gone for ``lost_after`` seconds.
    """

    #: What the error messages call this source, e.g. "NDI source".
    what = "NDI source"

    def __init__(self, source: str, find_timeout: float, lost_after: float, bandwidth: str) -> None:
        query = source.strip()
        if not query:
            raise ValueError(f"{type(self).__name__} needs the sender's name, e.g. 'HOST (TouchDesigner)'")
        self._ndi = load_cyndilib(f"the {self.what}")
        self._finder: Any = None
        self._receiver: Any = None
        self._next_check = 0.0
        ok = False
        try:
            # Discovery is polled on this thread (update_sources) instead of cyndilib's own
            # finder thread: with that thread running, a process that also sends NDI crashed
            # (SIGSEGV) about one start in six here.
            self._finder = self._ndi.Finder()
            self.name = find_source(self._finder, query, find_timeout)
            found = self._finder.get_source(self.name)
            if found is None:
                raise BridgeError(f"NDI source {self.name!r} vanished while connecting")
            self._receiver = self._ndi.Receiver(
                color_format=self._ndi.RecvColorFormat.RGBX_RGBA,
                bandwidth=getattr(self._ndi.RecvBandwidth, bandwidth),
                allow_video_fields=False,
                recv_name=RECEIVER_NAME,
            )
            self._attach(self._receiver.frame_sync)
            self._receiver.set_source(found)
            self._watch = ConnectionWatch(self.name, time.monotonic(), CONNECT_TIMEOUT,
                                          lost_after)
            log.info("%s %r connecting", self.what, self.name)
            ok = True
        except BridgeError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BridgeError(f"could not open {self.what} {query!r}: {exc}") from exc
        finally:
            if not ok:
                self.close()

    def _attach(self, frame_sync: Any) -> None:
        """Give the receiver's frame sync the frame objects it captures into."""
        raise NotImplementedError

    def _check_connection(self, now: float) -> None:
        """Every ``CONNECTION_CHECK_INTERVAL``: ``BridgeError`` when the source is lost."""
        if now < self._next_check:
            return
        self._next_check = now + CONNECTION_CHECK_INTERVAL
        try:
            connected = bool(self._receiver.is_connected())
        except SDK_ERRORS as exc:
            raise BridgeError(f"NDI receiver failed: {exc}") from exc
        problem = self._watch.update(now, connected)
        if problem is not None:
            raise BridgeError(problem)

    def _release(self) -> None:
        """Disconnect and drop the receiver and finder."""
        receiver, self._receiver = self._receiver, None
        finder, self._finder = self._finder, None
        shut_down(receiver, "disconnect", "NDI receiver", SDK_ERRORS, log)
        shut_down(finder, "close", "NDI finder", SDK_ERRORS, log)


class NdiSource(_Receiving):
    """Frames from the NDI sender named ``source`` (full ``"HOST (Stream)"`` or a unique part).

    Opening waits up to ``find_timeout`` seconds for the sender to be discovered and raises
    ``BridgeError`` (with the names seen) when it is not, so the runtime retries with backoff.
    Frames are read with NDI's frame sync as RGBA; ``recv`` returns only frames that are new.
    A connection that never comes up or is gone for ``lost_after`` seconds raises
    ``BridgeError``; a sender that is connected but idle just makes ``recv`` return ``None``.
    Use from one thread.
    """

    def __init__(
        self,
        source: str,
        find_timeout: float = FIND_TIMEOUT,
        lost_after: float = LOST_AFTER,
    ) -> None:
        self._video: Any = None
        self._last_key: tuple[float, float, int, int] | None = None
        self._frames = FrameCounter()
        super().__init__(source, find_timeout, lost_after, "highest")

    def _attach(self, frame_sync: Any) -> None:
        self._video = self._ndi.VideoFrameSync()
        frame_sync.set_video_frame(self._video)

    def recv(self, timeout: float) -> Frame | None:
        """The next new frame, or ``None`` after ``timeout`` seconds without one."""
        if self._closed:
            raise BridgeError("NDI source is closed")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            frame = self._capture()
            now = time.monotonic()
            if frame is not None:
                self._watch.connected()
                return frame
            self._check_connection(now)
            if now >= deadline:
                return None
            time.sleep(min(POLL_INTERVAL, deadline - now))

    def _capture(self) -> Frame | None:
        video = self._video
        try:
            self._receiver.frame_sync.capture_video()
            width, height = int(video.xres), int(video.yres)
            if width <= 0 or height <= 0:  # nothing received yet
                return None
            key = (video.get_timestamp_posix(), video.get_timecode_posix(), width, height)
            if key == self._last_key:  # frame sync repeats the last frame until a new one
                return None
            self._last_key = key
            fourcc = self._ndi.FourCC(video.fourcc).name
            pixels = received_to_rgba(video.get_array(), width, height,
                                      int(video.get_line_stride()), fourcc)
        except SDK_ERRORS as exc:
            raise BridgeError(f"NDI receive from {self.name!r} failed: {exc}") from exc
        return self._frames.frame(pixels)

    def _release(self) -> None:
        super()._release()
        self._video = None


class NdiAudioSource(_Receiving):
    """Audio from the NDI sender named ``source``, for the audio followers (no video received).

    The shape of ``engine.modulation.audio.AudioSource``: ``read(max_frames)`` returns the newest
    audio as ``(frames, channels)`` float32, empty when nothing new arrived. NDI's frame sync
    is pulled at the pace it is built for: each ``read`` takes as many samples as real time
    moved on since the last one (at most a second; pulling more makes it pad with silence),
    converted to ``sample_rate`` and ``channels`` whatever the sender sends, unscaled (NDI's
    native reference level, so a sender's 1.0 reads as 1.0). Opening
    and a connection that never comes up or is gone for ``lost_after`` seconds raise
    ``BridgeError`` as ``NdiSource`` does. ``read`` and ``close`` may run on different threads.
    """

    what = "NDI audio source"

    def __init__(
        self,
        source: str,
        find_timeout: float = FIND_TIMEOUT,
        lost_after: float = LOST_AFTER,
        sample_rate: int = AUDIO_SAMPLE_RATE,
        channels: int = AUDIO_CHANNELS,
    ) -> None:
        if sample_rate < 8000 or not 1 <= channels <= 8:
            raise ValueError(f"NDI audio of {sample_rate} Hz, {channels} channels; "
                             "allowed: at least 8000 Hz, 1 to 8 channels")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self._audio: Any = None
        self._lock = threading.Lock()
        self._pulled_at = time.monotonic()
        self._carry = 0.0  # the fraction of a sample real time owes the next read
        super().__init__(source, find_timeout, lost_after, "audio_only")

    def __repr__(self) -> str:
        return f"NdiAudioSource({getattr(self, 'name', '?')!r})"

    def _attach(self, frame_sync: Any) -> None:
        self._audio = self._ndi.AudioFrameSync()
        self._audio.sample_rate = self.sample_rate  # what each capture asks NDI to convert to
        self._audio.num_channels = self.channels
        frame_sync.set_audio_frame(self._audio)

    def read(self, max_frames: int) -> np.ndarray:
        """Up to ``max_frames`` of the newest audio as ``(frames, channels)`` float32; empty when
        nothing new arrived. ``BridgeError`` when the source is lost or closed."""
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        with self._lock:
            if self._closed:
                raise BridgeError("NDI audio source is closed")
            now = time.monotonic()
            self._check_connection(now)
            due = (now - self._pulled_at) * self.sample_rate + self._carry
            self._pulled_at = now
            count = min(int(due), self.sample_rate)
            self._carry = due - count if count < self.sample_rate else 0.0
            samples = None
            try:
                if count and self._receiver.frame_sync.capture_audio(count):
                    samples = self._audio.get_array()
            except SDK_ERRORS as exc:
                raise BridgeError(f"NDI audio receive from {self.name!r} failed: {exc}") from exc
        if samples is None or samples.shape[1] == 0:
            return np.empty((0, self.channels), np.float32)
        if samples.shape[0] != self.channels:
            raise BridgeError(f"NDI delivered {samples.shape[0]} audio channels; "
                              f"asked for {self.channels}")
        return np.ascontiguousarray(samples[:, -max_frames:].T, dtype=np.float32)

    def _release(self) -> None:
        with self._lock:  # a read on another thread finishes first
            super()._release()
            self._audio = None


class NdiSink(Closing):
    """An NDI sender named ``name`` (shown as ``"HOST (name)"``) sending the frames it is given.

    Sends are asynchronous and unclocked (the engine paces itself): ``send`` copies the frame
    into the sender's buffer and returns while NDI compresses it. The sender is created on the
    first frame and re-created when the frame size changes. Odd sizes are cropped to even
    (NDI's own rule). ``alpha=False`` sends the alpha byte as padding (opaque, less
    bandwidth); ``fps`` is the rate advertised to receivers. Use from one thread.
    """

    def __init__(self, name: str = "latentstage", fps: float = DEFAULT_FPS,
                 alpha: bool = False) -> None:
        self.name = check_sender_name(name)
        self._rate = frame_rate(fps)
        self._fourcc = send_fourcc(alpha)
        self._ndi = load_cyndilib("the NDI sink")
        self._sender: Any = None
        self._size: tuple[int, int] | None = None

    @property
    def source_name(self) -> str | None:
        """The full NDI name receivers see (``"HOST (name)"``) once the first frame was sent."""
        return None if self._sender is None else str(self._sender.name)

    def send(self, frame: Frame) -> None:
        """Send one RGBA frame; ``BridgeError`` when NDI refuses it."""
        if self._closed:
            raise BridgeError("NDI sink is closed")
        pixels = check_rgba(frame.pixels, "NdiSink.send")
        width, height = send_size(frame.width, frame.height)
        if (width, height) != self._size:
            self._open_sender(width, height)
        data = np.ascontiguousarray(pixels[:height, :width]).reshape(-1)
        try:
            sent = self._sender.write_video_async(data)
        except SDK_ERRORS as exc:
            raise BridgeError(f"NDI send failed: {exc}") from exc
        if not sent:
            raise BridgeError("NDI sender is not running")

    def _open_sender(self, width: int, height: int) -> None:
        self._close_sender()
        ndi = self._ndi
        try:
            video = ndi.VideoSendFrame()
            video.set_resolution(width, height)
            video.set_fourcc(getattr(ndi.FourCC, self._fourcc))
            video.set_frame_rate(self._rate)
            sender = ndi.Sender(self.name, clock_video=False, clock_audio=False)
            sender.set_video_frame(video)
            sender.open()
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BridgeError(f"could not open NDI sender {self.name!r}: {exc}") from exc
        self._sender, self._size = sender, (width, height)
        log.info("NDI sender %r sending %dx%d %s at %s fps", sender.name, width, height,
                 self._fourcc, self._rate)

    def _close_sender(self) -> None:
        sender, self._sender, self._size = self._sender, None, None
        shut_down(sender, "close", "NDI sender", SDK_ERRORS, log)

    def _release(self) -> None:
        """Stop and destroy the sender."""
        self._close_sender()

