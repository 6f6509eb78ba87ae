"""Built-in moving colour test pattern source, paced on a monotonic schedule."""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from bridges.base import Closing, Frame, SourceClosed

log = logging.getLogger(__name__)

MIN_SIZE = 8
MAX_SIZE = 16384
MAX_FPS = 1000.0

# Eight saturated bars (white, yellow, cyan, green, magenta, red, blue, black).
_BARS = np.array(
    [
        [235, 235, 235],
        [235, 235, 16],
        [16, 235, 235],
        [16, 235, 16],
        [235, 16, 235],
        [235, 16, 16],
        [16, 16, 235],
        [16, 16, 16],
    ],
    dtype=np.uint8,
)
_COUNTER_BITS = 16


def unavailable_reason() -> str | None:
    """The pattern needs nothing but numpy: always available."""
    return None


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{name} must be an integer between {MIN_SIZE} and {MAX_SIZE}, got {value!r}"
        )
    if not MIN_SIZE <= int(value) <= MAX_SIZE:
        raise ValueError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {value}")
    return int(value)


def _check_fps(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"fps must be a number > 0 and <= {MAX_FPS:g}, got {value!r}")
    fps = float(value)
    if not (math.isfinite(fps) and 0.0 < fps <= MAX_FPS):
        raise ValueError(f"fps must be a number > 0 and <= {MAX_FPS:g}, got {value!r}")
    return fps


class PatternSource(Closing):
    """A moving, colourful test pattern (no input needed), one frame every ``1/fps`` seconds.

    The picture: scrolling colour bars with a sweeping white line on top, a drifting
    rainbow gradient below, a bouncing circle that changes colour, and a strip at the
    bottom showing the frame index in binary (white = 1), so consecutive frames always
    differ. Frame ``k`` is due at ``start + k / fps`` (no drift); a caller that comes late
    gets the newest due frame and the missed indices are skipped (``Frame.sequence`` shows
    the gap) instead of a burst of stale frames.
    """

    def __init__(self, fps: float = 30.0, width: int = 512, height: int = 512) -> None:
        self.fps = _check_fps(fps)
        self.width = _check_size("width", width)
        self.height = _check_size("height", height)
        self._period = 1.0 / self.fps
        self._x = np.arange(self.width, dtype=np.float32)
        self._y = np.arange(self.height, dtype=np.float32)
        self._bars_end = max(1, self.height * 9 // 16)
        self._strip_start = self.height - max(2, self.height // 16)
        # Bit shown by each column of the counter strip (most significant bit on the left).
        self._bit_of_column = (_COUNTER_BITS - 1 - (np.arange(self.width) * _COUNTER_BITS)
                               // self.width).astype(np.int64)
        self._start: float | None = None
        self._next_index = 0

    def __repr__(self) -> str:
        return f"PatternSource(test pattern {self.width}x{self.height} @ {self.fps:g} fps)"

    def __str__(self) -> str:
        return f"test pattern {self.width}x{self.height} @ {self.fps:g} fps"

    def render(self, index: int) -> np.ndarray:
        """The RGBA ``(height, width, 4)`` picture of frame ``index`` (pure function of it)."""
        w, h = self.width, self.height
        t = index / self.fps
        out = np.empty((h, w, 4), dtype=np.uint8)
        out[..., 3] = 255

        # Scrolling colour bars (a quarter of the width per second) with a sweeping line.
        bars = ((self._x + np.float32(t * w * 0.25)) * np.float32(8.0 / w)).astype(np.int64) % 8
        out[: self._bars_end, :, :3] = _BARS[bars][None]
        line_x = (index * 3) % w
        out[: self._bars_end, line_x, :3] = 255

        # Drifting rainbow gradient (cosine palette) below the bars.
        rows = self._y[self._bars_end : self._strip_start]
        if rows.size:
            phase = (self._x[None, :] * np.float32(1.0 / w)
                     + rows[:, None] * np.float32(0.5 / h)
                     - np.float32(t * 0.2)) * np.float32(2.0 * math.pi)
            for channel, shift in enumerate((0.0, 2.0 * math.pi / 3.0, 4.0 * math.pi / 3.0)):
                out[self._bars_end : self._strip_start, :, channel] = (
                    np.float32(127.5) + np.float32(127.0) * np.cos(phase + np.float32(shift))
                ).astype(np.uint8)

        # A circle on a Lissajous path, changing colour over time.
        radius = max(2.0, min(w, h) * 0.12)
        cx = w * (0.5 + 0.35 * math.sin(2.0 * math.pi * 0.23 * t))
        cy = h * (0.45 + 0.3 * math.sin(2.0 * math.pi * 0.31 * t + 1.0))
        x0, x1 = max(0, int(cx - radius)), min(w, int(cx + radius) + 1)
        y0, y1 = max(0, int(cy - radius)), min(h, int(cy + radius) + 1)
        if x0 < x1 and y0 < y1:
            dx2 = (self._x[x0:x1] - np.float32(cx)) ** 2
            dy2 = (self._y[y0:y1] - np.float32(cy)) ** 2
            inside = dy2[:, None] + dx2[None, :] <= np.float32(radius * radius)
            colour = np.array(
                [127.5 + 127.0 * math.cos(2.0 * math.pi * (t * 0.5 + k / 3.0)) for k in range(3)],
                dtype=np.float32,
            ).astype(np.uint8)
            out[y0:y1, x0:x1, :3][inside] = colour

        # Frame index in binary along the bottom strip.
        bits = ((index >> self._bit_of_column) & 1).astype(np.uint8) * np.uint8(255)
        out[self._strip_start :, :, :3] = bits[None, :, None]
        return out

    def recv(self, timeout: float) -> Frame | None:
        """The next frame once due, if that is within ``timeout`` seconds; else ``None``."""
        if self._closed:
            raise SourceClosed(f"{self} is closed")
        wait_limit = timeout if timeout > 0 else 0.0  # also turns NaN into 0
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._next_index * self._period
        if due > now:
            if due - now > wait_limit:
                if wait_limit > 0:
                    time.sleep(wait_limit)
                return None
            time.sleep(due - now)
            index = self._next_index
        else:
            # Late (or exactly on time): deliver the newest due frame, skip the missed ones.
            index = max(self._next_index, int((now - self._start) / self._period))
        self._next_index = index + 1
        return Frame(self.render(index), time.monotonic(), index)

    def _release(self) -> None:
        """Nothing to free: a closed pattern only refuses ``recv``."""

