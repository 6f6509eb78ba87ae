"""Audio sources for the followers: ``read`` and ``close``, from a WAV/FLAC file or an input device."""

from __future__ import annotations

import collections
import logging
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bridges.base import Closing, SourceClosed, missing_sdk

log = logging.getLogger(__name__)

_SCALE = {2: 1.0 / 32768.0, 3: 1.0 / 8388608.0, 4: 1.0 / 2147483648.0}
"""PCM sample width in bytes → the factor that maps it onto [-1, 1)."""
WAV_TEXT = "a PCM WAV file of 16, 24 or 32-bit samples, mono or stereo"
MAX_CHANNELS = 2


@runtime_checkable
class AudioSource(Protocol):
    """Where audio comes from: ``read`` and ``close``; ``sample_rate`` (Hz) and ``channels``."""

    sample_rate: int
    channels: int

    def read(self, max_frames: int) -> np.ndarray:
        """Up to ``max_frames`` of the newest audio as ``(frames, channels)`` float32 in [-1, 1];
        an empty array when nothing new arrived. Raises ``SourceClosed`` when the source ended."""
        ...

    def close(self) -> None:
        """Release everything; safe to call twice."""
        ...


def pcm_to_float(data: bytes, width: int, channels: int) -> np.ndarray:
    """Little-endian signed PCM bytes of ``width`` bytes per sample → ``(frames, channels)`` float32."""
    if width == 3:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
    else:
        ints = np.frombuffer(data, dtype="<i2" if width == 2 else "<i4")
    return (ints.astype(np.float32) * np.float32(_SCALE[width])).reshape(-1, channels)


class _PacedFile(Closing):
    """A file played at real-time pace on ``clock`` (seconds): ``read`` returns what is due.

    When the reader falls behind by more than ``max_frames`` the older audio is skipped (the
    newest audio wins, as the engine's input slot does); ``loop`` starts over at the end.
    """

    sample_rate: int
    channels: int

    def __init__(self, frames: int, loop: bool, clock: Callable[[], float]) -> None:
        if frames <= 0:
            self.close()
            raise ValueError(f"audio file {self!r} holds no audio; allowed: a file of at least one frame")
        self.frames = frames
        self.loop = loop
        self._clock = clock
        self._started: float | None = None
        self._due_done = 0  # frames delivered or skipped since the start

    def read(self, max_frames: int) -> np.ndarray:
        now = self._clock()
        if self._started is None:
            self._started = now
        due = int((now - self._started) * self.sample_rate) - self._due_done
        if not self.loop and self._due_done >= self.frames:
            raise SourceClosed(f"{self!r} reached its end")
        if due <= 0:
            return np.empty((0, self.channels), dtype=np.float32)
        if due > max_frames:
            self._advance(due - max_frames)
            due = max_frames
        return self._take(due)

    def _advance(self, count: int) -> None:
        self._due_done += count
        if self.loop:
            self._seek(self._due_done % self.frames)
        else:
            self._seek(min(self._due_done, self.frames))

    def _take(self, count: int) -> np.ndarray:
        blocks = []
        while count > 0:
            position = self._due_done % self.frames if self.loop else self._due_done
            if position >= self.frames:
                break
            if self.loop and position == 0:
                self._seek(0)
            chunk = self._read_raw(min(count, self.frames - position))
            if len(chunk) == 0:
                break
            blocks.append(chunk)
            count -= len(chunk)
            self._due_done += len(chunk)
        if not blocks:
            return np.empty((0, self.channels), dtype=np.float32)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    def _read_raw(self, count: int) -> np.ndarray:
        raise NotImplementedError

    def _seek(self, frame: int) -> None:
        raise NotImplementedError


class WavSource(_PacedFile):
    """A PCM WAV file (16/24/32-bit, mono or stereo) through the stdlib ``wave`` module."""

    def __init__(
        self, path: str | Path, loop: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        try:
            self._wav = wave.open(str(self.path), "rb")  # noqa: SIM115 (open while the source lives)
        except (wave.Error, EOFError) as exc:
            raise ValueError(f"audio file {self.path}: {exc}; allowed: {WAV_TEXT}") from None
        self._width = self._wav.getsampwidth()
        self.channels = self._wav.getnchannels()
        self.sample_rate = self._wav.getframerate()
        if self._width not in _SCALE or not 1 <= self.channels <= MAX_CHANNELS:
            self._wav.close()
            raise ValueError(
                f"audio file {self.path}: {self._width * 8}-bit, {self.channels} channels; "
                f"allowed: {WAV_TEXT}"
            )
        super().__init__(self._wav.getnframes(), loop, clock)

    def __repr__(self) -> str:
        return f"WavSource({str(self.path)!r})"

    def _read_raw(self, count: int) -> np.ndarray:
        return pcm_to_float(self._wav.readframes(count), self._width, self.channels)

    def _seek(self, frame: int) -> None:
        self._wav.setpos(frame)

    def _release(self) -> None:
        self._wav.close()


class SoundFileSource(_PacedFile):
    """A FLAC (or other libsndfile) file through the optional ``soundfile`` package."""

    def __init__(
        self, path: str | Path, loop: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        try:
            import soundfile
        except ImportError:
            raise missing_sdk("audio", "FLAC audio", "the soundfile package is not installed") from None
        self.path = Path(path)
        try:
            self._file: Any = soundfile.SoundFile(str(self.path))
        except (RuntimeError, soundfile.LibsndfileError) as exc:
            raise ValueError(f"audio file {self.path}: {exc}; allowed: a FLAC or WAV file") from None
        self.channels = int(self._file.channels)
        self.sample_rate = int(self._file.samplerate)
        super().__init__(int(self._file.frames), loop, clock)

    def __repr__(self) -> str:
        return f"SoundFileSource({str(self.path)!r})"

    def _read_raw(self, count: int) -> np.ndarray:
        return np.asarray(self._file.read(count, dtype="float32", always_2d=True))

    def _seek(self, frame: int) -> None:
        self._file.seek(frame)

    def _release(self) -> None:
        self._file.close()


def open_audio_file(
    path: str | Path, loop: bool = False, clock: Callable[[], float] = time.monotonic
) -> _PacedFile:
    """A ``WavSource`` for ``.wav``, a ``SoundFileSource`` for anything else (FLAC; needs the extra)."""
    if Path(path).suffix.lower() == ".wav":
        return WavSource(path, loop, clock)
    return SoundFileSource(path, loop, clock)


class DeviceSource(Closing):
    """An audio input device through the optional ``sounddevice`` package (PortAudio).

    The device's callback keeps the newest ``buffer_seconds`` of audio; ``read`` drains it.
    """

    def __init__(
        self,
        device: int | str | None = None,
        sample_rate: int = 48000,
        channels: int = 1,
        block: int = 256,
        buffer_seconds: float = 0.5,
    ) -> None:
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            raise missing_sdk("audio", "Audio input", f"sounddevice could not be loaded ({exc})") from None
        self.sample_rate = sample_rate
        self.channels = channels
        self._blocks: collections.deque[np.ndarray] = collections.deque(
            maxlen=max(1, int(buffer_seconds * sample_rate / block))
        )
        self._lock = threading.Lock()
        self._stream = sounddevice.InputStream(
            device=device,
            samplerate=sample_rate,
            channels=channels,
            blocksize=block,
            dtype="float32",
            callback=self._callback,
        )
        self._stream.start()

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        with self._lock:
            self._blocks.append(indata.copy())

    def read(self, max_frames: int) -> np.ndarray:
        with self._lock:
            blocks = list(self._blocks)
            self._blocks.clear()
        if not blocks:
            return np.empty((0, self.channels), dtype=np.float32)
        return np.concatenate(blocks)[-max_frames:]

    def _release(self) -> None:
        self._stream.stop()
        self._stream.close()
