"""Record output frames to a video file via PyAV (H.264 by default, MPEG-4 fallback)."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from bridges.base import BridgeError, BridgeUnavailable, Closing, Frame, check_rgba
from bridges.video import load_av

if TYPE_CHECKING:
    from av.container import OutputContainer
    from av.video.stream import VideoStream

log = logging.getLogger(__name__)

FALLBACK_CODEC = "mpeg4"
KEYFRAME_SECONDS = 1.0
"""At most this much wall time between keyframes: the most a crash (SIGKILL, power cut) loses."""
_MAX_FPS = 1000.0
# Pixel formats whose chroma planes are subsampled by two in both directions (even sizes only).
_EVEN_FORMATS = {"yuv420p", "yuvj420p", "nv12", "nv21"}


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


def choose_codec(av: ModuleType, requested: str) -> str:
    """``requested`` when this PyAV build can encode video with it, else ``"mpeg4"`` (warned)."""
    if _encoder_available(av, requested):
        return requested
    if not _encoder_available(av, FALLBACK_CODEC):
        raise BridgeError(
            f"neither the video encoder {requested!r} nor {FALLBACK_CODEC!r} is available "
            "in this PyAV build"
        )
    log.warning("video encoder %r is not available in this PyAV build; recording with %r instead",
                requested, FALLBACK_CODEC)
    return FALLBACK_CODEC


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


def encoder_options(codec: str, fps: float) -> dict[str, str]:
    """Encoder options that bound what a crash can lose.

    A keyframe at least every ``fps`` frames (one second of the file) starts a fragment;
    libx264 runs with ``tune=zerolatency`` (no lookahead, no B-frames), because its default
    lookahead kept ~14 frames — about 3 s at a CPU's 5 fps — inside the encoder, where a
    crash loses them.
    """
    options = {"g": str(max(1, round(fps)))}
    if codec == "libx264":
        options.update(preset="veryfast", crf="18", tune="zerolatency")
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
    """Writes every frame it is sent to a video file at a constant ``fps``.

    The first frame fixes the size of the file. A later frame of another size (a live
    resolution change, or bypass with an input of another size) is scaled to fit inside it,
    keeping its aspect ratio, with black bars — the recording goes on in one file.
    H.264 / MPEG-4 need even sizes in yuv420p: an odd width or height is cropped by one
    pixel (logged once). Timestamps come from a frame counter, so the file plays at ``fps``
    whatever the rate frames arrived at. ``close()`` flushes the encoder and finalises the
    file; nothing is written when no frame arrived.

    Crash safety: MP4/MOV are fragmented with a keyframe (and so a fragment) at least every
    ``keyframe_seconds`` of the frames' capture time and every second of the file, the encoder
    holds no frames back, and every packet is flushed to the operating system. After a
    SIGKILL or a crash the file decodes up to at most the last ~``keyframe_seconds``.
    """

    def __init__(self, path: str = "out/demo.mp4", fps: float = 30.0, codec: str = "libx264",
                 keyframe_seconds: float = KEYFRAME_SECONDS) -> None:
        self._av = load_av("the record bridge")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (
            math.isfinite(fps) and 0.0 < fps <= _MAX_FPS
        ):
            raise ValueError(f"fps must be a number > 0 and <= {_MAX_FPS:g}, got {fps!r}")
        self.path = os.fspath(path)
        self.fps = float(fps)
        self.requested_codec = codec
        self.codec = choose_codec(self._av, codec)
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BridgeError(f"cannot create the folder {str(parent)!r} for {self.path!r}: {exc}"
                              ) from exc
        if isinstance(keyframe_seconds, bool) or not isinstance(keyframe_seconds, (int, float)) or not (
            math.isfinite(keyframe_seconds) and keyframe_seconds > 0
        ):
            raise ValueError(f"keyframe_seconds must be a number > 0, got {keyframe_seconds!r}")
        self.keyframe_seconds = float(keyframe_seconds)
        self._last_key_at: float | None = None
        self.frames_written = 0
        self._container: OutputContainer | None = None
        self._stream: VideoStream | None = None
        self._input_size: tuple[int, int] | None = None  # (width, height) of incoming frames
        self._encoded_size: tuple[int, int] = (0, 0)
        self._logged_sizes: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RecordSink({self.path!r}, fps={self.fps:g}, codec={self.codec!r})"

    def _open(self, width: int, height: int) -> None:
        av = self._av
        codec = av.codec.Codec(self.codec, "w")
        formats = [f.name for f in (codec.video_formats or ())]
        pix_fmt = "yuv420p" if not formats or "yuv420p" in formats else formats[0]
        enc_w, enc_h = width, height
        if pix_fmt in _EVEN_FORMATS:
            enc_w, enc_h = width - width % 2, height - height % 2
        if enc_w < 2 or enc_h < 2:
            raise BridgeError(f"frame size {width}x{height} is too small to record")
        if (enc_w, enc_h) != (width, height):
            log.info("frame size %dx%d is odd; %s needs even sizes, so %s is cropped to %dx%d",
                     width, height, pix_fmt, self.path, enc_w, enc_h)
        rate = Fraction(self.fps).limit_denominator(1001)
        try:
            container = av.open(self.path, mode="w", options=container_options(self.path))
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise BridgeError(f"cannot create video file {self.path!r}: {exc}") from exc
        try:
            stream = container.add_stream(self.codec, rate=rate,
                                          options=encoder_options(self.codec, self.fps))
            stream.width = enc_w
            stream.height = enc_h
            stream.pix_fmt = pix_fmt
            stream.codec_context.time_base = Fraction(1) / rate
            if self.codec != "libx264":
                stream.bit_rate = max(1_000_000, int(enc_w * enc_h * self.fps * 0.3))
        except (av.error.FFmpegError, ValueError) as exc:
            container.close()
            raise BridgeError(f"cannot set up {self.codec!r} encoding for {self.path!r}: {exc}"
                              ) from exc
        self._container = container
        self._stream = stream
        self._input_size = (width, height)
        self._encoded_size = (enc_w, enc_h)
        log.info("recording %s: %dx%d @ %g fps, %s %s", self.path, enc_w, enc_h, self.fps,
                 self.codec, pix_fmt)

    def send(self, frame: Frame) -> None:
        """Encode one frame; ``BridgeError`` on a size change or an encoder failure."""
        av = self._av
        pixels = check_rgba(frame.pixels, "RecordSink.send")
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        with self._lock:
            if self._closed:
                raise BridgeError(f"recording to {self.path!r} is closed")
            if self._input_size is None:
                self._open(width, height)
            container, stream = self._container, self._stream
            assert container is not None and stream is not None
            enc_w, enc_h = self._encoded_size
            if (width, height) != self._input_size:
                pixels = self._letterbox(pixels)
            elif (enc_w, enc_h) != (width, height):
                pixels = pixels[:enc_h, :enc_w]
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgba")
            video_frame.pts = self.frames_written
            if self._key_due(frame.timestamp):
                video_frame.pict_type = av.video.frame.PictureType.I
            try:
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            except (av.error.FFmpegError, OSError) as exc:
                raise BridgeError(f"encoding frame {self.frames_written} to {self.path!r} "
                                  f"failed: {exc}") from exc
            self.frames_written += 1

    def _key_due(self, timestamp: float) -> bool:
        """Whether this frame must be a keyframe: one per ``keyframe_seconds`` of wall time.

        The file's own keyframe a second counts frames at the file's rate; a CPU that makes
        5 frames a second would reach it only every 6 s of the show, and a crash would lose
        those 6 s. Forcing a keyframe by the frames' capture time bounds the loss in real time.
        """
        last = self._last_key_at
        if last is None or not 0 <= timestamp - last < self.keyframe_seconds:
            self._last_key_at = timestamp
            return True
        return False

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

    def close(self) -> None:
        """Flush the encoder and finalise the file; safe to call twice."""
        av = self._av
        with self._lock:
            if self._closed:
                return
            self._closed = True
            container, stream = self._container, self._stream
            self._container = self._stream = None
            if container is None or stream is None:
                log.info("no frames were sent, so %s was not written", self.path)
                return
            try:
                try:
                    for packet in stream.encode(None):
                        container.mux(packet)
                finally:
                    container.close()
            except (av.error.FFmpegError, OSError) as exc:
                raise BridgeError(f"finishing {self.path!r} failed: {exc}") from exc
            log.info("wrote %d frames to %s", self.frames_written, self.path)


class RecordingOpener:
    """Opens the record sink; a reopen after a failure writes ``take-2.mp4``, ``take-3.mp4`` ...

    Reopening the same path would truncate everything recorded so far, which for an
    installation running for weeks is the one thing a recorder must never do. A take that
    never got a file (its folder became read-only, the disk was full) is tried again under
    the same number, so a failing folder does not count up takes that do not exist.
    """

    def __init__(
        self, options: Mapping[str, Any], extra: Mapping[str, Any], keep_existing: bool = False
    ) -> None:
        self.options = dict(options)
        self.extra = dict(extra)
        self.opened = 0
        self.keep_existing = keep_existing  # a resumed show: the file of the run before is kept too

    def __call__(self) -> RecordSink:
        self.opened += 1
        options = dict(self.options)
        first = str(options["path"])
        if self.opened > 1 or (self.keep_existing and os.path.lexists(first)):
            number = 2
            while os.path.lexists(numbered_path(first, number)):
                number += 1
            options["path"] = numbered_path(first, number)
            log.warning("recording continues in %s (the earlier files are kept)", options["path"])
        return RecordSink(**options, **self.extra)


def numbered_path(path: str, number: int) -> str:
    """``out/take.mp4`` → ``out/take-2.mp4`` (the number before the extension)."""
    stem, dot, extension = path.rpartition(".")
    if not dot or "/" in extension or "\\" in extension:
        return f"{path}-{number}"
    return f"{stem}-{number}.{extension}"
