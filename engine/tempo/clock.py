"""TempoClock: beats, bars and phase from a BPM and a beat origin, at times given in seconds."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)

MIN_BPM = 20.0
MAX_BPM = 999.0
MIN_BEATS_PER_BAR = 1
MAX_BEATS_PER_BAR = 32


class Quantum(str, Enum):
    """Where a quantised change lands: ``off`` (at once) or the next beat, bar, 2 bars or 4 bars."""

    OFF = "off"
    BEAT = "beat"
    BAR = "bar"
    TWO_BARS = "2bars"
    FOUR_BARS = "4bars"

    def beats(self, beats_per_bar: int) -> float:
        """The length of one quantum in beats for a bar of ``beats_per_bar`` beats (``off``: 0)."""
        if self is Quantum.OFF:
            return 0.0
        if self is Quantum.BEAT:
            return 1.0
        return float(_QUANTUM_BARS[self] * beats_per_bar)


def as_quantum(value: Quantum | str) -> Quantum:
    """``value`` as a ``Quantum``, or a ValueError naming it and the allowed values."""
    try:
        return Quantum(value)
    except ValueError:
        allowed = " | ".join(q.value for q in Quantum)
        raise ValueError(f"quantum {value!r} is not allowed: {allowed}") from None


_QUANTUM_BARS = {Quantum.BAR: 1, Quantum.TWO_BARS: 2, Quantum.FOUR_BARS: 4}


def validate_bpm(bpm: float) -> float:
    """``bpm`` as a float, or a ValueError naming it and the allowed range."""
    value = float(bpm)
    if not MIN_BPM <= value <= MAX_BPM:  # also refuses NaN
        raise ValueError(f"bpm {bpm!r} is out of range: allowed {MIN_BPM:g}..{MAX_BPM:g}")
    return value


def validate_beats_per_bar(beats_per_bar: int) -> int:
    """``beats_per_bar`` as an int, or a ValueError naming it and the allowed range."""
    if (
        isinstance(beats_per_bar, bool)
        or not isinstance(beats_per_bar, int)
        or not (MIN_BEATS_PER_BAR <= beats_per_bar <= MAX_BEATS_PER_BAR)
    ):
        raise ValueError(
            f"beats_per_bar {beats_per_bar!r} is not allowed: an integer "
            f"{MIN_BEATS_PER_BAR}..{MAX_BEATS_PER_BAR}"
        )
    return beats_per_bar


@dataclass(frozen=True)
class TempoState:
    """The tempo line: at ``time`` (seconds) the position is ``beat`` (beats) and it moves at ``bpm``.

    Immutable, so a reader holds a consistent view without a lock. Beat 0 is the downbeat of
    bar 0; bars are counted from it.
    """

    time: float
    beat: float
    bpm: float
    beats_per_bar: int

    @property
    def seconds_per_beat(self) -> float:
        return 60.0 / self.bpm

    def beat_at(self, t: float) -> float:
        """Beats since the origin at time ``t`` (seconds); negative before it."""
        return self.beat + (t - self.time) * self.bpm / 60.0

    def time_at(self, beat: float) -> float:
        """The time (seconds) at which the position is ``beat``, at the current tempo."""
        return self.time + (beat - self.beat) * 60.0 / self.bpm


class TempoClock:
    """Beat, bar and phase at a tempo; thread-safe, with lock-free reads.

    Every method takes the time ``t`` in seconds on the ``now`` clock (``time.monotonic`` unless
    another function is injected, as tests do) or, when ``t`` is ``None``, reads ``now()``.
    Writers (``set_bpm``, ``resync``, ``set_beat``, ``set_beats_per_bar``; the OSC thread, a tap,
    a MIDI clock) replace one immutable ``TempoState`` under one lock; readers (the frame loop,
    once per frame) read that attribute and do a few float operations, never waiting.
    Times in the future are extrapolated at the current tempo.
    """

    def __init__(
        self,
        bpm: float = 120.0,
        beats_per_bar: int = 4,
        now: Callable[[], float] = time.monotonic,
        origin: float | None = None,
    ) -> None:
        """``origin``: the time (seconds) of beat 0, the downbeat of bar 0 (default: ``now()``)."""
        self._now = now
        self._lock = threading.Lock()
        self._state = TempoState(
            time=now() if origin is None else float(origin),
            beat=0.0,
            bpm=validate_bpm(bpm),
            beats_per_bar=validate_beats_per_bar(beats_per_bar),
        )

    # -- reads (lock-free) ------------------------------------------------------------------------

    def state(self) -> TempoState:
        """The current tempo line (immutable; read it once per frame for a consistent view)."""
        return self._state

    def _t(self, t: float | None) -> float:
        return self._now() if t is None else t

    @property
    def bpm(self) -> float:
        return self._state.bpm

    @property
    def beats_per_bar(self) -> int:
        return self._state.beats_per_bar

    @property
    def seconds_per_beat(self) -> float:
        """The length of one beat in seconds at the current tempo."""
        return self._state.seconds_per_beat

    def beat(self, t: float | None = None) -> float:
        """Beats since the origin at ``t`` (float; negative before the origin)."""
        return self._state.beat_at(self._t(t))

    def bar(self, t: float | None = None) -> float:
        """Bars since the origin at ``t`` (float; ``floor`` gives the bar index)."""
        state = self._state
        return state.beat_at(self._t(t)) / state.beats_per_bar

    def phase(self, t: float | None = None, beats: float = 1.0) -> float:
        """Position in ``[0, 1)`` within a period of ``beats`` beats counted from the origin."""
        if not beats > 0 or math.isinf(beats):
            raise ValueError(f"beats {beats!r} is not allowed: a period must be a finite number > 0")
        cycles = self._state.beat_at(self._t(t)) / beats
        frac = cycles - math.floor(cycles)
        return 0.0 if frac >= 1.0 else frac  # float rounding of tiny negative values

    def next_boundary(self, t: float | None, quantum: Quantum | str) -> float:
        """The time (seconds) of the first ``quantum`` boundary at or after ``t``; ``off``: ``t``.

        Boundaries are whole multiples of the quantum counted from beat 0 (so ``2bars`` falls on
        bars 0, 2, 4…). Assumes the tempo stays as it is until then.
        """
        at = self._t(t)
        state = self._state
        length = as_quantum(quantum).beats(state.beats_per_bar)
        if length == 0.0:
            return at
        cycles = state.beat_at(at) / length
        index = math.ceil(cycles - 1e-9)  # a time on a boundary (to float rounding) is its own
        return max(at, state.time_at(index * length))

    def boundary_index(self, t: float | None, quantum: Quantum | str) -> int:
        """Which ``quantum`` period ``t`` falls in (floor of beats / quantum length).

        A change of this index between two frames means a boundary was crossed in between
        ("on each beat"). ``off`` has no boundaries: a ValueError.
        """
        state = self._state
        length = as_quantum(quantum).beats(state.beats_per_bar)
        if length == 0.0:
            raise ValueError(
                f"quantum {as_quantum(quantum).value!r} has no boundaries: allowed beat | bar | 2bars | 4bars"
            )
        return math.floor(state.beat_at(self._t(t)) / length + 1e-9)

    # -- writes (one lock) ------------------------------------------------------------------------

    def set_bpm(self, bpm: float, t: float | None = None, *, on_beat: bool = False) -> TempoState:
        """Change the tempo at ``t`` keeping the beat position there continuous (no jump).

        ``on_beat``: ``t`` is also a beat (a tap): the position at ``t`` moves to the nearest whole
        beat, so the phase follows the tap while the beat count stays.
        """
        value = validate_bpm(bpm)
        with self._lock:
            at = self._t(t)
            old = self._state
            beat = old.beat_at(at)
            if on_beat:
                beat = float(round(beat))
            self._state = TempoState(at, beat, value, old.beats_per_bar)
            log.debug("tempo %.3f -> %.3f bpm at beat %.3f", old.bpm, value, beat)
            return self._state

    def set_beat(self, beat: float, t: float | None = None, bpm: float | None = None) -> TempoState:
        """Set the position at ``t`` to ``beat`` (and the tempo, if given): for an external source
        (MIDI clock, Link) that owns the position."""
        if not math.isfinite(beat):
            raise ValueError(f"beat {beat!r} is not allowed: a finite number of beats")
        value = None if bpm is None else validate_bpm(bpm)
        with self._lock:
            old = self._state
            self._state = TempoState(
                self._t(t), float(beat), old.bpm if value is None else value, old.beats_per_bar
            )
            return self._state

    def resync(self, t: float | None = None) -> TempoState:
        """``t`` becomes the downbeat of bar 0 (beat 0); the tempo stays."""
        return self.set_beat(0.0, t)

    def set_beats_per_bar(self, beats_per_bar: int, t: float | None = None) -> TempoState:
        """Change the metre at ``t``; the beat position stays, bars are recounted from beat 0."""
        value = validate_beats_per_bar(beats_per_bar)
        with self._lock:
            at = self._t(t)
            old = self._state
            self._state = TempoState(at, old.beat_at(at), old.bpm, value)
            return self._state
