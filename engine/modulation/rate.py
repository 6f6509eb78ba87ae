"""LFO rates: '1bar', '2bars', '1/4beat', '0.5hz' or a plain number of Hz, as cycles elapsed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

MAX_HZ = 100.0
"""The fastest rate in Hz (well above any frame rate; faster would only alias)."""
MAX_PERIOD = 1024.0
"""The longest period in beats, bars or seconds."""
RATE_TEXT = (
    "a positive number or fraction followed by beat(s), bar(s) or hz (e.g. '1bar', '2bars', "
    f"'0.5beat', '1/4beat', '1/16bar', '0.5hz'), or a plain number of Hz; at most {MAX_HZ:g} Hz, "
    f"periods at most {MAX_PERIOD:g} beats, bars or seconds"
)

_RATE = re.compile(
    r"\s*(?P<num>\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*(?P<den>\d+(?:\.\d*)?|\.\d+))?\s*(?P<unit>[A-Za-z]*)\s*"
)


class RateUnit(str, Enum):
    """What a rate's period counts: beats, bars (musical time) or seconds (a rate in Hz)."""

    BEATS = "beats"
    BARS = "bars"
    SECONDS = "seconds"


_UNITS = {
    "": RateUnit.SECONDS,
    "hz": RateUnit.SECONDS,
    "beat": RateUnit.BEATS,
    "beats": RateUnit.BEATS,
    "bar": RateUnit.BARS,
    "bars": RateUnit.BARS,
}


@dataclass(frozen=True)
class Rate:
    """How fast a modulator cycles.

    Attributes:
        unit: what ``period`` counts.
        period: one cycle, in beats, bars or seconds (``unit``); positive.
    """

    unit: RateUnit
    period: float

    @property
    def hz(self) -> float | None:
        """Cycles per second for a rate in Hz; ``None`` for a musical rate."""
        return 1.0 / self.period if self.unit is RateUnit.SECONDS else None

    def cycles(self, seconds: float, beats: float, beats_per_bar: float = 4.0) -> float:
        """Periods elapsed: from ``beats`` (since the clock's origin) for beats and bars, from
        ``seconds`` for Hz."""
        if self.unit is RateUnit.SECONDS:
            return seconds / self.period
        if self.unit is RateUnit.BEATS:
            return beats / self.period
        return beats / (self.period * beats_per_bar)

    def __str__(self) -> str:
        if self.unit is RateUnit.SECONDS:
            return f"{1.0 / self.period:g}hz"
        word = "beat" if self.unit is RateUnit.BEATS else "bar"
        return f"{self.period:g}{word}" if self.period == 1 else f"{self.period:g}{word}s"


def parse_rate(text: str | float) -> Rate:
    """``text`` as a ``Rate``; ``ValueError`` naming the bad text and what is allowed."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"rate {text!r} is not a rate; allowed: {RATE_TEXT}")
    if isinstance(text, (int, float)):
        return _rate(RateUnit.SECONDS, float(text), text, hz=True)
    match = _RATE.fullmatch(text)
    unit = _UNITS.get(match.group("unit").lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"rate {text!r:.40} is not a rate; allowed: {RATE_TEXT}")
    amount = float(match.group("num"))
    if match.group("den") is not None:
        denominator = float(match.group("den"))
        if denominator == 0:
            raise ValueError(f"rate {text!r:.40} divides by zero; allowed: {RATE_TEXT}")
        amount /= denominator
    return _rate(unit, amount, text, hz=unit is RateUnit.SECONDS)


def _rate(unit: RateUnit, amount: float, shown: object, hz: bool) -> Rate:
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"rate {shown!r:.40} is not positive; allowed: {RATE_TEXT}")
    if hz and amount > MAX_HZ:
        raise ValueError(f"rate {shown!r:.40} is faster than {MAX_HZ:g} Hz; allowed: {RATE_TEXT}")
    period = 1.0 / amount if hz else amount
    if period > MAX_PERIOD:
        raise ValueError(f"rate {shown!r:.40} is too slow; allowed: {RATE_TEXT}")
    return Rate(unit, period)
