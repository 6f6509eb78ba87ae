"""An LFO: a waveform at a musical or Hz rate, scaled by a depth in the target's units."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.modulation.rate import Rate
from engine.modulation.shapes import Shape, wave


@dataclass(frozen=True)
class Lfo:
    """A low-frequency oscillator.

    Attributes:
        shape: the waveform.
        rate: one cycle per ``rate`` (beats, bars or seconds).
        depth: the peak offset, in the target parameter's units (negative inverts).
        phase_offset: added to the phase, in cycles (0.25 = a quarter cycle ahead).
        seed: the random shapes' seed.
    """

    shape: Shape
    rate: Rate
    depth: float = 1.0
    phase_offset: float = 0.0
    seed: int = 0
    _wave: Callable[[float, int, int], float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_wave", wave(self.shape))

    def sample(self, seconds: float, beats: float, beats_per_bar: float = 4.0) -> float:
        """The offset at ``seconds`` / ``beats`` since the clock's origin: depth × shape value."""
        cycles = self.rate.cycles(seconds, beats, beats_per_bar) + self.phase_offset
        cycle = math.floor(cycles)
        return self.depth * self._wave(cycles - cycle, cycle, self.seed)
