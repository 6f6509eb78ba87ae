"""LFO waveforms: a value in [-1, 1] from a phase in [0, 1), a cycle index and a seed."""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

_MASK64 = (1 << 64) - 1
_TWO_PI = 2.0 * math.pi


class Shape(str, Enum):
    """An LFO waveform; every shape starts its cycle at phase 0 and repeats each cycle."""

    SINE = "sine"
    TRIANGLE = "triangle"
    SAW = "saw"
    SQUARE = "square"
    SAMPLE_HOLD = "sample_hold"
    SMOOTH_RANDOM = "smooth_random"


def random_unit(seed: int, cycle: int) -> float:
    """A deterministic value in [-1, 1] for ``(seed, cycle)`` (splitmix64; no global RNG)."""
    z = (seed * 0x9E3779B97F4A7C15 + cycle * 0xD1B54A32D192ED03 + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (2.0 / (1 << 53)) - 1.0


def _sine(phase: float, cycle: int, seed: int) -> float:
    return math.sin(_TWO_PI * phase)


def _triangle(phase: float, cycle: int, seed: int) -> float:
    # In step with the sine: 0 at phase 0, +1 at 0.25, 0 at 0.5, -1 at 0.75.
    if phase < 0.25:
        return 4.0 * phase
    if phase < 0.75:
        return 2.0 - 4.0 * phase
    return 4.0 * phase - 4.0


def _saw(phase: float, cycle: int, seed: int) -> float:
    return 2.0 * phase - 1.0


def _square(phase: float, cycle: int, seed: int) -> float:
    return 1.0 if phase < 0.5 else -1.0


def _sample_hold(phase: float, cycle: int, seed: int) -> float:
    return random_unit(seed, cycle)


def _smooth_random(phase: float, cycle: int, seed: int) -> float:
    start = random_unit(seed, cycle)
    end = random_unit(seed, cycle + 1)
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * phase))


_WAVES: dict[Shape, Callable[[float, int, int], float]] = {
    Shape.SINE: _sine,
    Shape.TRIANGLE: _triangle,
    Shape.SAW: _saw,
    Shape.SQUARE: _square,
    Shape.SAMPLE_HOLD: _sample_hold,
    Shape.SMOOTH_RANDOM: _smooth_random,
}


def wave(shape: Shape) -> Callable[[float, int, int], float]:
    """The function ``(phase, cycle, seed) -> value`` of ``shape`` (look it up once, call per frame)."""
    return _WAVES[shape]


def value(shape: Shape, phase: float, cycle: int = 0, seed: int = 0) -> float:
    """``shape`` at ``phase`` in [0, 1) of cycle number ``cycle``; in [-1, 1].

    Sample-and-hold holds one seeded value per cycle; smooth random eases (cosine) from the
    value of cycle ``k`` to that of ``k + 1``, so it is continuous across cycles.
    """
    return _WAVES[shape](phase, cycle, seed)
