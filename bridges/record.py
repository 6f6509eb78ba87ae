"""Record output frames to a video file via PyAV, at the show's speed (H.264 by default)."""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from bridges.base import BridgeError, BridgeUnavailable, Closing, Frame, check_rgba
from bridges.video import load_av

if TYPE_CHECKING:
    from av.container import OutputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

log = logging.getLogger(__name__)

KEYFRAME_SECONDS = 1.0
"""At most this much wall time between keyframes: the most a crash (SIGKILL, power cut) loses."""
MAX_FILL_SECONDS = 5.0
"""A gap between two frames is filled by repeating the earlier one for at most this long;
beyond it the file's clock jumps ahead (players hold the picture), so a long stall of the
engine cannot keep the sink thread encoding copies."""
_MAX_FPS = 1000.0
# Pixel formats whose chroma planes are subsampled by two in both directions (even sizes only).
_EVEN_FORMATS = {"yuv420p", "yuvj420p", "nv12", "nv21"}
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
"""File extensions a recording may have, and the FFmpeg muxer each one is written with."""
COMMON_CODECS = (
    "libx264", "h264_nvenc", "h264_videotoolbox", "libx265", "hevc_nvenc", "hevc_videotoolbox",
    "libvpx-vp9", "libvpx", "libsvtav1", "libaom-av1", "prores_ks", "ffv1", "mjpeg", "mpeg4",
)
"""Video encoders worth naming when a codec is refused (those this PyAV build has are listed)."""
WEBM_CODECS = ("libvpx-vp9", "libvpx", "libsvtav1", "libaom-av1")
"""WebM takes only VP8, VP9 and AV1."""
_PROBE_SIZE = 256  # hardware encoders refuse tiny frames


def unavailable_reason() -> str | None:
    """``None`` when PyAV can be imported, else why not."""
    try:
        load_av("the record bridge")
    except BridgeUnavailable:
        return "PyAV is not installed (pip install latentstage[video])"
    return None


def _encoder_available(av: ModuleType, name: str) -> bool:
    try:
        codec = av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, av.error.FFmpegError):
        return False
    return bool(codec.type == "video")


@dataclass(frozen=True)
class RecordingProblem:
    """Why a recording cannot be written: the option (``path`` or ``codec``), what is wrong and
    what is allowed."""

    option: str
    problem: str
    allowed: str

    def __str__(self) -> str:
        return f"{self.problem}; allowed: {self.allowed}"


def container_format(path: str) -> str | None:
    """The FFmpeg muxer for ``path``'s extension (``None``: not one a recording may have)."""
    return CONTAINERS.get(os.path.splitext(path)[1].lower())


def name_problem(av: ModuleType, path: str, codec: str) -> RecordingProblem | None:
    """A problem with the extension of ``path`` or the encoder name ``codec`` (cheap: no I/O)."""
    extension = os.path.splitext(path)[1]
    if container_format(path) is None:
        shown = f"the extension {extension!r}" if extension else "no extension"
        return RecordingProblem(
            "path", f"{path!r} has {shown}, not a video container", ", ".join(sorted(CONTAINERS))
        )
    if not _encoder_available(av, codec):
        have = [name for name in COMMON_CODECS if _encoder_available(av, name)]
        return RecordingProblem(
            "codec",
            f"{codec!r} is not a video encoder of this PyAV build",
            f"an FFmpeg video encoder this build has, e.g. {', '.join(have)}",
        )
    return None


def check_recording(path: str, codec: str, fps: float = 30.0) -> RecordingProblem | None:
    """Whether PyAV can write ``codec`` into a file like ``path``: the names first, then one
    frame encoded into the same container in memory, exactly as the sink sets it up (a
    ``.webm`` refuses H.264; a hardware encoder without its device fails to open)."""
    av = load_av("the record bridge")
    problem = name_problem(av, path, codec)
    if problem is not None:
        return problem
    fmt = container_format(path)
    try:
        with av.open(io.BytesIO(), mode="w", format=fmt) as container:
            stream, _ = _add_stream(av, container, codec, fps, _PROBE_SIZE, _PROBE_SIZE)
            blank = np.zeros((_PROBE_SIZE, _PROBE_SIZE, 4), np.uint8)
            frame = av.VideoFrame.from_ndarray(blank, format="rgba")
            for packet in (*stream.encode(frame), *stream.encode(None)):
                container.mux(packet)
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        extension = os.path.splitext(path)[1]
        suggested = WEBM_CODECS if fmt == "webm" else ("libx264", "libx265", "mpeg4")
        have = ", ".join(name for name in suggested if _encoder_available(av, name))
        return RecordingProblem(
            "codec",
            f"{codec!r} cannot be written into a {extension} file here ({exc})",
            f"an encoder {extension} files take, e.g. {have}",
        )
    return None


def _add_stream(
    av: ModuleType, container: OutputContainer, codec_name: str, fps: float, width: int, height: int,
    keyframe_seconds: float = KEYFRAME_SECONDS,
) -> tuple[VideoStream, str]:
    """The video stream of a recording (the sink's and the start check's): its pixel format
    and size (cropped to even for 4:2:0), rate, encoder options and bit rate."""
    codec = av.codec.Codec(codec_name, "w")
    formats = [f.name for f in (codec.video_formats or ())]
    pix_fmt = "yuv420p" if not formats or "yuv420p" in formats else formats[0]
    if pix_fmt in _EVEN_FORMATS:
        width, height = width - width % 2, height - height % 2
    if width < 2 or height < 2:
        raise BridgeError(f"frame size {width}x{height} is too small to record")
    rate = Fraction(fps).limit_denominator(1001)
    options = encoder_options(codec_name, fps, keyframe_seconds)
    stream = cast("VideoStream", container.add_stream(codec_name, rate=rate, options=options))
    stream.width = width
    stream.height = height
    stream.pix_fmt = pix_fmt
    stream.codec_context.time_base = Fraction(1) / rate
    if codec_name != "libx264":
        stream.bit_rate = max(1_000_000, int(width * height * fps * 0.3))
    return stream, pix_fmt


def container_options(path: str) -> dict[str, str]:
    """Muxer options: MP4/MOV are written fragmented, so a crash or power cut mid-show still
    leaves a playable file up to the last fragment (a plain MP4 is unreadable until closed).

    ``flush_packets`` hands every muxed packet to the operating system at once: without it
    FFmpeg's 32 KiB write buffer held the header and the first fragments in the process,
    and a SIGKILL in the first ~10 s left a 28-byte file.
    """
    options = {"flush_packets": "1"}
    if path.lower().endswith((".mp4", ".mov", ".m4v")):
        options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
    return options


def encoder_options(codec: str, fps: float, keyframe_seconds: float = KEYFRAME_SECONDS) -> dict[str, str]:
    """Encoder options that bound what a crash can lose.

    A keyframe every ``keyframe_seconds`` of the file starts a fragment; the file's time is the
    frames' capture time (the sink repeats and drops to keep it so), so that is a keyframe per
    ``keyframe_seconds`` of the show however fast the engine runs. libx264 runs with
    ``tune=zerolatency`` (no lookahead, no B-frames), because its default lookahead kept ~14
    frames — about 3 s at a CPU's 5 fps — inside the encoder, where a crash loses them. It also
    runs at constant quality (``qcomp=1``): with the default rate control a repeated frame (an
    engine slower than the file) kept being refined at 5-8 KB a copy on noisy pictures; at
    constant quality a copy costs ~30 bytes after one refinement (measured: 30 % smaller files
    of the CPU demo, sharper new frames).
    """
    options = {"g": str(max(1, round(fps * keyframe_seconds)))}
    if codec == "libx264":
        options.update(preset="veryfast", crf="18", tune="zerolatency", **{"x264-params": "qcomp=1.0"})
    return options


def fit_inside(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int, int, int]:
    """The largest ``(w, h)`` of aspect ``width:height`` inside the box, and its offset ``(x, y)``.

    Sizes are at least 1 pixel; the picture is centred (black bars left/right or top/bottom).
    """
    scale = min(box_w / width, box_h / height)
    fit_w = max(1, min(box_w, round(width * scale)))
    fit_h = max(1, min(box_h, round(height * scale)))
    return fit_w, fit_h, (box_w - fit_w) // 2, (box_h - fit_h) // 2


class RecordSink(Closing):
    """Writes frames to a constant-frame-rate video file that plays at the speed of the show.

    Each frame is placed by its capture time (``Frame.timestamp``, ``time.monotonic()``), as a
    screen recorder does: when the engine is slower than the file's ``fps`` the previous frame
    is repeated until the next one is due, when it is faster a frame whose slot is taken is
    dropped (a frame may land up to one frame late, so jitter around the file rate does not
    stutter). The file's time zero is ``origin`` (the runtime passes the moment it opened the
    sink; before the first frame the file is black) or, by default, the first frame's capture
    time; ``close()`` holds the last frame until the show's end (``hold_until``: the runtime
    says when a ``--duration`` ran out or a stop was asked for) or else the moment of closing.
    So the file lasts as long as the wall time it covers (to a frame) and stays in sync with
    audio recorded beside it. Gaps longer than ``MAX_FILL_SECONDS`` are not filled frame by
    frame: the file's clock jumps and players hold the picture.

    The first frame fixes the size of the file. A later frame of another size (a live
    resolution change, or bypass with an input of another size) is scaled to fit inside it,
    keeping its aspect ratio, with black bars — the recording goes on in one file.
    H.264 / MPEG-4 need even sizes in yuv420p: an odd width or height is cropped by one
    pixel (logged once). The container comes from the extension (``CONTAINERS``) and the
    encoder must exist in this PyAV build; ``check_recording`` tries the pair at start.
    Nothing is written when no frame arrived.

    Crash safety: MP4/MOV are fragmented with a keyframe (and so a fragment) every
    ``keyframe_seconds`` of the file, which is the frames' capture time, the encoder holds no
    frames back, and every packet is flushed to the operating system. A frame is encoded when it
    arrives (its repeats when the next one does). After a
    SIGKILL or a crash the file decodes up to at most the last ~``keyframe_seconds``.
    """

    def __init__(self, path: str = "out/demo.mp4", fps: float = 30.0, codec: str = "libx264",
                 keyframe_seconds: float = KEYFRAME_SECONDS, origin: float | None = None) -> None:
        self._av = load_av("the record bridge")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (
            math.isfinite(fps) and 0.0 < fps <= _MAX_FPS
        ):
            raise ValueError(f"fps must be a number > 0 and <= {_MAX_FPS:g}, got {fps!r}")
        if isinstance(keyframe_seconds, bool) or not isinstance(keyframe_seconds, (int, float)) or not (
            math.isfinite(keyframe_seconds) and keyframe_seconds > 0
        ):
            raise ValueError(f"keyframe_seconds must be a number > 0, got {keyframe_seconds!r}")
        self.path = os.fspath(path)
        problem = name_problem(self._av, self.path, codec)
        if problem is not None:
            raise BridgeError(f"cannot record to {self.path!r}: {problem.option}: {problem}")
        self.fps = float(fps)
        self.codec = codec
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BridgeError(f"cannot create the folder {str(parent)!r} for {self.path!r}: {exc}"
                              ) from exc
        self.keyframe_seconds = float(keyframe_seconds)
        self._origin = origin
        self._end: float | None = None  # when the show ended (hold_until); else close() is the end
        self._next_pts = 0  # the next free slot of the file (frames_written)
        self._previous: VideoFrame | None = None  # the last encoded picture, in the stream's format
        self.frames_written = 0  # frames in the file, repeats included
        self.frames_repeated = 0
        self.frames_dropped = 0
        self._container: OutputContainer | None = None
        self._stream: VideoStream | None = None
        self._pix_fmt = "yuv420p"
        self._input_size: tuple[int, int] | None = None  # (width, height) of incoming frames
        self._encoded_size: tuple[int, int] = (0, 0)
        self._logged_sizes: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RecordSink({self.path!r}, fps={self.fps:g}, codec={self.codec!r})"

    @property
    def seconds(self) -> float:
        """The duration of the file so far."""
        return self.frames_written / self.fps

    @property
    def origin(self) -> float | None:
        """The capture time (``time.monotonic()``) the file starts at; None before a frame when
        it starts with its first frame."""
        return self._origin

    def _open(self, width: int, height: int) -> None:
        av = self._av
        try:
            container = av.open(self.path, mode="w", format=container_format(self.path),
                                options=container_options(self.path))
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise BridgeError(f"cannot create video file {self.path!r}: {exc}") from exc
        try:
            stream, pix_fmt = _add_stream(av, container, self.codec, self.fps, width, height,
                                          self.keyframe_seconds)
        except (av.error.FFmpegError, ValueError, BridgeError) as exc:
            container.close()
            raise BridgeError(f"cannot set up {self.codec!r} encoding for {self.path!r}: {exc}"
                              ) from exc
        enc_w, enc_h = stream.width, stream.height
        if (enc_w, enc_h) != (width, height):
            log.info("frame size %dx%d is odd; %s needs even sizes, so %s is cropped to %dx%d",
                     width, height, pix_fmt, self.path, enc_w, enc_h)
        self._container = container
        self._stream = stream
        self._pix_fmt = pix_fmt
        self._input_size = (width, height)
        self._encoded_size = (enc_w, enc_h)
        log.info("recording %s: %dx%d @ %g fps, %s %s", self.path, enc_w, enc_h, self.fps,
                 self.codec, pix_fmt)

    def send(self, frame: Frame) -> None:
        """Place one frame by its capture time; ``BridgeError`` when the file cannot be
        written (created, encoded, muxed)."""
        av = self._av
        pixels = check_rgba(frame.pixels, "RecordSink.send")
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        with self._lock:
            if self._closed:
                raise BridgeError(f"recording to {self.path!r} is closed")
            if self._input_size is None:
                self._open(width, height)
            slot = self._slot_for(frame.timestamp)
            if slot is None:
                self.frames_dropped += 1  # the engine runs faster than the file
                return
            enc_w, enc_h = self._encoded_size
            if (width, height) != self._input_size:
                pixels = self._letterbox(pixels)
            elif (enc_w, enc_h) != (width, height):
                pixels = pixels[:enc_h, :enc_w]
            rgba = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgba")
            picture = rgba.reformat(format=self._pix_fmt)  # once, also for its repeats
            self._repeat_until(slot)
            self._encode(picture, slot)
            self._previous = picture

    def _slot_for(self, timestamp: float) -> int | None:
        """The file slot (frame index) of a frame captured at ``timestamp``; None: drop it.

        A frame goes to the slot nearest its time; when that one is taken it takes the next
        free slot if that is less than a frame late, else it is dropped.
        """
        if self._origin is None or (
            self._next_pts == 0 and not 0.0 <= timestamp - self._origin <= MAX_FILL_SECONDS
        ):
            self._origin = timestamp  # the file starts with this frame
        exact = (timestamp - self._origin) * self.fps
        nearest = math.floor(exact + 0.5)
        if nearest >= self._next_pts:
            return nearest
        if self._next_pts - exact < 1.0:
            return self._next_pts
        return None

    def _repeat_until(self, slot: int) -> None:
        """Fill the slots before ``slot`` with the previous picture (black before the first),
        at most ``MAX_FILL_SECONDS`` of them; the file's clock jumps over the rest."""
        missing = min(slot - self._next_pts, math.ceil(MAX_FILL_SECONDS * self.fps))
        if missing <= 0:
            return
        filler = self._previous if self._previous is not None else self._black()
        for _ in range(missing):
            self._encode(filler, self._next_pts)
            self.frames_repeated += 1

    def _black(self) -> VideoFrame:
        enc_w, enc_h = self._encoded_size
        black = np.zeros((enc_h, enc_w, 4), dtype=np.uint8)
        black[..., 3] = 255
        return self._av.VideoFrame.from_ndarray(black, format="rgba").reformat(format=self._pix_fmt)

    def _encode(self, picture: VideoFrame, slot: int) -> None:
        container, stream = self._container, self._stream
        assert container is not None and stream is not None
        picture.pts = slot
        try:
            for packet in stream.encode(picture):
                container.mux(packet)
        except (self._av.error.FFmpegError, OSError) as exc:
            raise BridgeError(f"encoding frame {slot} to {self.path!r} failed: {exc}") from exc
        self.frames_written += 1
        self._next_pts = slot + 1

    def _letterbox(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` of another size scaled to fit the recording, centred on black."""
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        enc_w, enc_h = self._encoded_size
        fit_w, fit_h, x, y = fit_inside(width, height, enc_w, enc_h)
        if (width, height) not in self._logged_sizes:
            self._logged_sizes.add((width, height))
            log.info("recording %s: frames of %dx%d are scaled to %dx%d inside %dx%d",
                     self.path, width, height, fit_w, fit_h, enc_w, enc_h)
        source = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgba")
        scaled = source.reformat(width=fit_w, height=fit_h, format="rgba").to_ndarray()
        canvas = np.zeros((enc_h, enc_w, 4), dtype=np.uint8)
        canvas[..., 3] = 255
        canvas[y:y + fit_h, x:x + fit_w] = scaled[:fit_h, :fit_w]
        return canvas

    def hold_until(self, end: float) -> None:
        """The show ended at ``end`` (``time.monotonic()``): ``close()`` holds the last frame
        until then instead of until the moment it runs (the runtime tells a recording when a
        ``--duration`` ran out or a stop was asked for, before it drains and closes)."""
        with self._lock:
            self._end = end

    def close(self) -> None:
        """Hold the last frame until the show's end (``hold_until``, else now), flush the encoder
        and finalise the file; safe twice."""
        av = self._av
        with self._lock:
            if self._closed:
                return
            self._closed = True
            container, stream = self._container, self._stream
            if container is None or stream is None:
                log.info("no frames were sent, so %s was not written", self.path)
                return
            now = time.monotonic() if self._end is None else self._end
            try:
                try:
                    self._hold_last_frame(now)
                    for packet in stream.encode(None):
                        container.mux(packet)
                finally:
                    container.close()
                    self._container = self._stream = None
            except (av.error.FFmpegError, OSError, BridgeError) as exc:
                raise BridgeError(f"finishing {self.path!r} failed: {exc}") from exc
            covered = "" if self._origin is None else f" covering {now - self._origin:.2f} s of wall time"
            log.info("wrote %s: %.2f s%s, %d frames (%d repeats of a slower engine, %d dropped of a "
                     "faster one)", self.path, self.seconds, covered, self.frames_written,
                     self.frames_repeated, self.frames_dropped)

    def _hold_last_frame(self, now: float) -> None:
        """The last picture stays in the file until ``now`` (the show went on showing it).

        Only when ``now`` is on the frames' clock and within ``MAX_FILL_SECONDS`` of the end.
        """
        if self._origin is None:
            return
        end = math.floor((now - self._origin) * self.fps + 0.5)
        if 0 < end - self._next_pts <= MAX_FILL_SECONDS * self.fps:
            self._repeat_until(end)


class RecordingOpener:
    """Opens the record sink; a reopen after a failure writes ``take-2.mp4``, ``take-3.mp4`` ...

    Reopening the same path would truncate everything recorded so far, which for an
    installation running for weeks is the one thing a recorder must never do. A take that
    never got a file (its folder became read-only, the disk was full) is tried again under
    the same name, so a failing folder does not count up takes that do not exist, and the
    move to a new file is logged once, not at every retry. Each take's time zero is the
    moment it was opened, so its timeline matches the wall clock from there.
    """

    def __init__(
        self, options: Mapping[str, Any], extra: Mapping[str, Any], keep_existing: bool = False
    ) -> None:
        self.options = dict(options)
        self.extra = dict(extra)
        self.opened = 0
        self.keep_existing = keep_existing  # a resumed show: the file of the run before is kept too
        self._announced: str | None = None

    def __call__(self) -> RecordSink:
        self.opened += 1
        options = dict(self.options)
        first = str(options["path"])
        if os.path.lexists(first) and (self.opened > 1 or self.keep_existing):
            number = 2
            while os.path.lexists(numbered_path(first, number)):
                number += 1
            options["path"] = numbered_path(first, number)
        if options["path"] != first and options["path"] != self._announced:
            self._announced = options["path"]
            log.warning("recording continues in %s (the earlier files are kept)", options["path"])
        return RecordSink(**options, **self.extra, origin=time.monotonic())


def numbered_path(path: str, number: int) -> str:
    """``out/take.mp4`` → ``out/take-2.mp4`` (the number before the extension)."""
    stem, dot, extension = path.rpartition(".")
    if not dot or "/" in extension or "\\" in extension:
        return f"{path}-{number}"
    return f"{stem}-{number}.{extension}"
