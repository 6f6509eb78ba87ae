"""ADSR envelopes: a level in [0, 1] over time (seconds or beats), fired by a trigger or a beat."""

from __future__ import annotations

import math
from enum import Enum

ENVELOPE_TIME_TEXT = "a finite number >= 0"


class TimeUnit(str, Enum):
    """What an envelope's times count: seconds or beats."""

    SECONDS = "seconds"
    BEATS = "beats"

    def pick(self, seconds: float, beats: float) -> float:
        """The clock reading in this unit."""
        return seconds if self is TimeUnit.SECONDS else beats


def _check_time(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"envelope {name} {value!r} is not allowed; allowed: {ENVELOPE_TIME_TEXT}")
    return float(value)


class Envelope:
    """Attack / decay / sustain / release, all times in ``unit`` (the caller's clock).

    ``trigger(t)`` rises linearly to 1 in ``attack``, falls to ``sustain`` in ``decay`` and holds;
    ``release(t)`` falls linearly from the level it had to 0 in ``release``. A retrigger starts
    from the current level (no jump) with the attack's slope. With ``hold`` set the envelope is a
    one-shot: each trigger releases by itself ``hold`` after it (beat-fired envelopes).
    """

    def __init__(
        self,
        attack: float = 0.01,
        decay: float = 0.1,
        sustain: float = 1.0,
        release: float = 0.2,
        unit: TimeUnit = TimeUnit.SECONDS,
        hold: float | None = None,
    ) -> None:
        self.attack = _check_time("attack", attack)
        self.decay = _check_time("decay", decay)
        self.release_time = _check_time("release", release)
        self.hold = None if hold is None else _check_time("hold", hold)
        if isinstance(sustain, bool) or not isinstance(sustain, (int, float)) or not 0 <= sustain <= 1:
            raise ValueError(f"envelope sustain {sustain!r} is not allowed; allowed: a level in [0, 1]")
        self.sustain = float(sustain)
        self.unit = unit
        self._start: float | None = None  # when a full attack from 0 would have started
        self._released: float | None = None  # when the gate closes (None: open)

    def trigger(self, t: float) -> None:
        """Open the gate at ``t``; from the current level, so a retrigger never jumps."""
        current = self.level(t)
        self._start = t - self.attack * current
        self._released = None if self.hold is None else t + self.hold

    def release(self, t: float) -> None:
        """Close the gate at ``t`` (nothing when it is not open)."""
        if self._start is not None and (self._released is None or self._released > t):
            self._released = t

    def _gate_level(self, t: float) -> float:
        """The level with the gate open, ``t`` after the (virtual) start of the attack."""
        assert self._start is not None
        elapsed = max(0.0, t - self._start)
        if elapsed < self.attack:
            return elapsed / self.attack
        elapsed -= self.attack
        if elapsed < self.decay:
            return 1.0 - (1.0 - self.sustain) * elapsed / self.decay
        return self.sustain

    def level(self, t: float) -> float:
        """The level at ``t``, in [0, 1]; 0 before the first trigger."""
        if self._start is None:
            return 0.0
        released = self._released
        if released is None or t < released:
            return self._gate_level(t)
        if self.release_time == 0 or t - released >= self.release_time:
            return 0.0
        return self._gate_level(released) * (1.0 - (t - released) / self.release_time)
