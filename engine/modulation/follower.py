"""Audio followers: RMS and frequency-band levels of a signal, smoothed with attack and release."""

from __future__ import annotations

import math
from enum import Enum

import numpy as np


class Band(str, Enum):
    """What an audio follower measures: the whole signal's RMS or one frequency band's."""

    RMS = "rms"
    LOW = "low"
    MID = "mid"
    HIGH = "high"


BAND_EDGES_HZ: dict[Band, tuple[float, float]] = {
    Band.LOW: (20.0, 150.0),
    Band.MID: (150.0, 2000.0),
    Band.HIGH: (2000.0, 8000.0),
}
"""Each band's lower (inclusive) and upper (exclusive) edge in Hz."""
_BANDS = tuple(Band)


def smoothing_coefficient(step: float, time_constant: float) -> float:
    """The one-pole coefficient for a step of ``step`` seconds toward a target with time constant
    ``time_constant`` seconds (reaches 63.2 % of a step in one time constant; 0: at once)."""
    return 1.0 if time_constant <= 0 else 1.0 - math.exp(-step / time_constant)


def _check(name: str, value: float, low: float, allowed: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
    ):
        raise ValueError(f"audio follower {name} {value!r} is not allowed; allowed: {allowed}")
    return float(value)


class AudioFollower:
    """RMS and band levels of audio blocks, each smoothed by a one-pole attack / release.

    Audio is mixed to mono and analysed every ``hop`` frames over the last ``window`` frames
    (a Hann-windowed real FFT). A band's level is the RMS of the signal's part in that band
    (windowed Parseval), so a full-scale sine reads ≈ 0.707 both as ``rms`` and in its band
    before ``gain``. ``level(band)`` is ``min(1, gain × smoothed)``; ``instant(band)`` the
    unsmoothed value of the last analysis, before gain.

    Args:
        sample_rate: of the audio fed in, Hz.
        attack, release: time constants in seconds for rising and falling levels (0: none).
        gain: scales ``level``; the output is clipped to [0, 1].
        window: FFT length in frames (also the RMS window).
        hop: frames between two analyses (the time resolution of the smoothing).
    """

    def __init__(
        self,
        sample_rate: int,
        attack: float = 0.01,
        release: float = 0.2,
        gain: float = 1.0,
        window: int = 2048,
        hop: int = 256,
    ) -> None:
        if not isinstance(sample_rate, int) or sample_rate < 8000:
            raise ValueError(
                f"audio follower sample rate {sample_rate!r} is not allowed; allowed: an int >= 8000"
            )
        if not isinstance(window, int) or not isinstance(hop, int) or not 0 < hop <= window:
            raise ValueError(
                f"audio follower window {window!r} / hop {hop!r} are not allowed; "
                "allowed: ints with 0 < hop <= window"
            )
        self.sample_rate = sample_rate
        self.attack = _check("attack", attack, 0.0, "seconds >= 0")
        self.release = _check("release", release, 0.0, "seconds >= 0")
        self.gain = _check("gain", gain, 0.0, "a number >= 0")
        self.window = window
        self.hop = hop
        step = hop / sample_rate
        self._rise = smoothing_coefficient(step, self.attack)
        self._fall = smoothing_coefficient(step, self.release)
        self._taper = np.hanning(window).astype(np.float32)
        # Windowed Parseval: sum over one side of |X|² × 2 / (N Σw²) is the band's mean square.
        self._power_scale = 2.0 / (window * float(np.sum(self._taper.astype(np.float64) ** 2)))
        bin_hz = sample_rate / window
        self._bins = {
            band: (max(1, math.ceil(low / bin_hz)), min(window // 2, math.ceil(high / bin_hz)))
            for band, (low, high) in BAND_EDGES_HZ.items()
        }
        self._history = np.zeros(window, dtype=np.float32)
        self._pending = 0  # frames since the last analysis
        self._instant = dict.fromkeys(_BANDS, 0.0)
        self._smoothed = dict.fromkeys(_BANDS, 0.0)

    def process(self, samples: np.ndarray) -> None:
        """Feed ``(frames, channels)`` or ``(frames,)`` float audio; analyses every ``hop`` frames."""
        mono = samples.mean(axis=1) if samples.ndim == 2 else samples
        start = 0
        while start < len(mono):
            take = min(self.hop - self._pending, len(mono) - start)
            self._history[:-take] = self._history[take:]
            self._history[-take:] = mono[start : start + take]
            self._pending += take
            start += take
            if self._pending == self.hop:
                self._pending = 0
                self._analyse()

    def _analyse(self) -> None:
        history = self._history
        self._instant[Band.RMS] = math.sqrt(float(np.dot(history, history)) / self.window)
        power = np.abs(np.fft.rfft(history * self._taper)) ** 2
        for band, (first, last) in self._bins.items():
            self._instant[band] = math.sqrt(float(power[first:last].sum()) * self._power_scale)
        for band in _BANDS:
            target = self._instant[band]
            previous = self._smoothed[band]
            coefficient = self._rise if target > previous else self._fall
            self._smoothed[band] = previous + coefficient * (target - previous)

    def instant(self, band: Band) -> float:
        """The last analysis of ``band``, unsmoothed and before gain."""
        return self._instant[band]

    def smoothed(self, band: Band) -> float:
        """``band`` smoothed by attack / release, before gain."""
        return self._smoothed[band]

    def level(self, band: Band) -> float:
        """``band`` smoothed, times ``gain``, clipped to [0, 1]."""
        return min(1.0, self.gain * self._smoothed[band])
