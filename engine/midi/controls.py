"""How raw controller messages become parameter values: pure logic, no ports, no mido.

Conventions used throughout:

- A MIDI data byte (CC value, note velocity, controller number) is an ``int`` in 0..127; anything
  else (a ``bool``, a float, 128, -1) raises ``ValueError`` naming the value and what is allowed.
- A *normalised* value is a float in 0..1: a 7-bit value ``v`` is ``v / 127``, a 14-bit value ``v``
  is ``v / 16383``, so full scale (127, or 127/127 as a pair) is exactly 1.0.
- The mapping from a normalised value to a parameter is ``to_range(shape(x, curve), low, high)``;
  the way back (for feedback LEDs and soft takeover) is ``unshape(from_range(value, low, high), curve)``.

The pieces: ``Pair14`` (14-bit CC pairs), ``decode_relative`` (relative encoders), ``shape`` and the
range helpers (curves), ``Takeover`` (soft takeover: pickup, jump, scale), and ``SwitchMode`` (note and
button behaviour: toggle, momentary, trigger). Coalescing a burst is the MIDI service's
(``engine.midi.service.coalesce``: one command per target a turn, buttons all in order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

DATA_MAX = 127  # a 7-bit data byte: 0..127
VALUE14_MAX = 16383  # a 14-bit value (MSB << 7 | LSB): 0..16383
PAIR_WINDOW_S = 0.02  # an LSB-first pair: the LSB is kept this long for its MSB (seconds)
TAKEOVER_TOLERANCE = 1 / 127  # one 7-bit step: "the fader is at the value"
CURVE_K = 4.0  # the exponential curve's constant: shape(0.5, EXP) ≈ 0.119 (about -18.5 dB)

T = TypeVar("T")


def check_data(value: object, what: str = "MIDI data byte") -> int:
    """``value`` if it is an ``int`` in 0..127 (not a ``bool``); else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= DATA_MAX:
        raise ValueError(f"{what} {value!r} is not allowed: allowed: an int in 0..{DATA_MAX}")
    return value


def check_unit(value: object, what: str = "normalised value") -> float:
    """``value`` as a float if it is a real number in 0..1; else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} {value!r} is not allowed: allowed: a number in 0..1")
    return float(value)


def normalise7(value: int) -> float:
    """A 7-bit value 0..127 as 0..1 (``value / 127``: 127 is exactly 1.0)."""
    return check_data(value) / DATA_MAX


def normalise14(value: int) -> float:
    """A 14-bit value 0..16383 as 0..1 (``value / 16383``: 127/127 is exactly 1.0)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= VALUE14_MAX:
        raise ValueError(f"14-bit value {value!r} is not allowed: allowed: an int in 0..{VALUE14_MAX}")
    return value / VALUE14_MAX


# ---------------------------------------------------------------------------------------------
# 14-bit CC pairs


class Pair14:
    """One 14-bit controller sent as two CCs: the MSB (coarse) and the LSB (fine).

    By the MIDI 1.0 spec the MSB is on CC n (0..31) and the LSB on CC n + 32; which two numbers a
    binding uses is the mapping file's business, this class only sees the two streams.

    MSB first (the spec, the default): an MSB sets the value's top 7 bits and resets the LSB to 0,
    so a controller that sends the MSB only still works, with 7-bit resolution; an LSB completes
    the value with the last MSB (a fine adjustment may send the LSB alone). An LSB before any MSB
    gives no value (``None``): the coarse part is unknown.

    LSB first (``lsb_first=True``, for the controllers that send the pair the other way round): an
    LSB is held and gives nothing (``None``); the next MSB completes the pair with it if the LSB
    came at most ``window_s`` seconds earlier (default 20 ms: a pair is sent back to back, about
    1 ms apart on a DIN cable, less over USB). An MSB without a held LSB, or with a stale one,
    resets the LSB to 0 as in the spec. Holding the LSB avoids the glitch of applying the new LSB
    to the old MSB (up to 127/16383 in the wrong direction); such a controller must send both bytes.

    ``feed_msb`` and ``feed_lsb`` return the current 14-bit value 0..16383, or ``None`` when there
    is nothing to apply; ``normalise14`` (``value / 16383``) makes it 0..1.
    """

    def __init__(
        self,
        lsb_first: bool = False,
        window_s: float = PAIR_WINDOW_S,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s >= 0:
            raise ValueError(f"window_s {window_s!r} is not allowed: allowed: seconds >= 0")
        self.lsb_first = lsb_first
        self.window_s = window_s
        self._now = now
        self._msb: int | None = None
        self._lsb = 0
        self._held: tuple[int, float] | None = None  # LSB first: (lsb, when)

    @property
    def value(self) -> int | None:
        """The current 14-bit value, or ``None`` before the first MSB."""
        return None if self._msb is None else self._msb << 7 | self._lsb

    def feed_msb(self, value: int) -> int | None:
        """An MSB (0..127) arrived: the new 14-bit value (never ``None``)."""
        self._msb = check_data(value, "MSB")
        self._lsb = 0
        if self._held is not None:
            lsb, when = self._held
            self._held = None
            if self._now() - when <= self.window_s:
                self._lsb = lsb
        return self.value

    def feed_lsb(self, value: int) -> int | None:
        """An LSB (0..127) arrived: the new 14-bit value, or ``None`` (no MSB yet; LSB first: held)."""
        lsb = check_data(value, "LSB")
        if self.lsb_first:
            self._held = (lsb, self._now())
            return None
        if self._msb is None:
            return None
        self._lsb = lsb
        return self.value


# ---------------------------------------------------------------------------------------------
# Relative encoders


class RelativeEncoding(Enum):
    """How an endless encoder sends a step as one 7-bit CC value.

    - ``twos_complement`` (7-bit two's complement; Native Instruments, Arturia "relative 1"):
      0 → 0, 1..63 → +1..+63, 127..65 → -1..-63, 64 → -64.
    - ``binary_offset`` (offset 64; Akai, Ableton "relative (binary offset)"):
      64 → 0, 65..127 → +1..+63, 63..0 → -1..-64.
    - ``sign_magnitude`` (bit 6 is the sign; Behringer, "signed bit"): 0..63 → 0..+63,
      64 → 0 (minus zero), 65..127 → -1..-63.
    """

    TWOS_COMPLEMENT = "twos_complement"
    BINARY_OFFSET = "binary_offset"
    SIGN_MAGNITUDE = "sign_magnitude"


def decode_relative(value: int, encoding: RelativeEncoding) -> int:
    """The signed step (-64..+63) an encoder's CC ``value`` (0..127) means under ``encoding``.

    The neutral value (0; 64 for binary offset; 0 and 64 for sign-magnitude) gives 0. A value
    that is not an int in 0..127 raises ``ValueError`` naming it and what is allowed.
    """
    check_data(value, "relative encoder value")
    if encoding is RelativeEncoding.TWOS_COMPLEMENT:
        return value - 128 if value >= 64 else value
    if encoding is RelativeEncoding.BINARY_OFFSET:
        return value - 64
    if encoding is RelativeEncoding.SIGN_MAGNITUDE:
        return -(value & 0x3F) if value & 0x40 else value
    allowed = ", ".join(e.value for e in RelativeEncoding)
    raise ValueError(f"relative encoding {encoding!r} is not allowed: allowed: {allowed}")


# ---------------------------------------------------------------------------------------------
# Curves and ranges


class Curve(Enum):
    """How a control's travel (0..1) is shaped before it is scaled to a parameter's range.

    - ``linear``: y = x.
    - ``exp``: y = (e^(k x) - 1) / (e^k - 1), k = ``CURVE_K`` = 4: fine control at the bottom of
      the travel (as a fader's audio taper); half travel gives about 0.119.
    - ``log``: the inverse of ``exp``, y = ln(1 + x (e^k - 1)) / k: fine control at the top;
      half travel gives about 0.831 (``shape(shape(x, Curve.EXP), Curve.LOG) == x``).

    All three are strictly increasing on [0, 1] with 0 → 0 and 1 → 1.
    """

    LINEAR = "linear"
    EXP = "exp"
    LOG = "log"


_EXPM1_K = math.expm1(CURVE_K)


def _clamp_unit(x: float, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or math.isnan(x):
        raise ValueError(f"{what} {x!r} is not allowed: allowed: a number in 0..1")
    return min(1.0, max(0.0, float(x)))


def _exp(x: float) -> float:
    return math.expm1(CURVE_K * x) / _EXPM1_K


def _log(x: float) -> float:
    return math.log1p(x * _EXPM1_K) / CURVE_K


def shape(x: float, curve: Curve) -> float:
    """``x`` (0..1, clamped) through ``curve``: 0..1, endpoints fixed, strictly increasing."""
    x = _clamp_unit(x, "curve input")
    if curve is Curve.LINEAR or x in (0.0, 1.0):
        return x
    y = _exp(x) if curve is Curve.EXP else _log(x)
    return min(1.0, max(0.0, y))


def unshape(y: float, curve: Curve) -> float:
    """The inverse of ``shape``: the travel ``x`` for which ``shape(x, curve) == y`` (clamped to 0..1)."""
    inverse = {Curve.LINEAR: Curve.LINEAR, Curve.EXP: Curve.LOG, Curve.LOG: Curve.EXP}[curve]
    return shape(y, inverse)


def to_range(x: float, low: float, high: float) -> float:
    """``x`` (0..1, clamped) scaled to ``low..high``: ``low + x (high - low)``; low > high inverts."""
    x = _clamp_unit(x, "normalised value")
    if x == 1.0:
        return float(high)
    return low + x * (high - low)


def from_range(value: float, low: float, high: float) -> float:
    """The inverse of ``to_range``: ``(value - low) / (high - low)``, clamped to 0..1.

    With low > high it inverts too (``value == low`` gives 0). A range of one point (low == high)
    gives 0.0 for any value.
    """
    if math.isnan(value):
        raise ValueError(f"value {value!r} is not allowed: allowed: a number")
    if high == low:
        return 0.0
    return min(1.0, max(0.0, (value - low) / (high - low)))


# ---------------------------------------------------------------------------------------------
# Soft takeover


class TakeoverMode(Enum):
    """What a fader does when the parameter it drives was changed elsewhere (OSC, a scene, the page).

    - ``pickup``: nothing until the fader reaches or passes the current value, then it follows.
    - ``jump``: the fader's position always applies (the parameter jumps to the fader).
    - ``scale`` ("value scaling"): the value moves toward the fader's end in proportion, so fader
      and value meet at the end of the travel; once they meet, it follows.
    """

    PICKUP = "pickup"
    JUMP = "jump"
    SCALE = "scale"


class Takeover:
    """Soft takeover for one binding of an absolute control (fader, knob) to one parameter.

    Both sides are control travel, normalised 0..1 before the curve (a parameter's value comes
    back as ``unshape(from_range(value, low, high), curve)``). ``sync(current)`` is called when the parameter
    changed from elsewhere, with its current normalised value: the binding re-arms (it must pick
    the value up again, unless the fader's last position is within the tolerance of it).
    ``feed(physical)`` takes the fader's new position and returns the
    normalised value to apply, or ``None`` (nothing to apply).

    "At the value" means within ``tolerance`` (default ``TAKEOVER_TOLERANCE`` = 1/127, one 7-bit
    step). Modes (``TakeoverMode``):

    - ``pickup``: with a known previous fader position f, the new position f' picks the value v up
      when v lies between f and f' (widened by the tolerance), so a fast fader that jumps over v
      still catches it; from then on it follows. The new position is applied, not v.
    - ``jump``: every position applies.
    - ``scale``: moving the fader from f to f' moves the value from v to
      v + (f' - f) (1 - v) / (1 - f) upward and v - (f - f') v / f downward (so the value reaches
      1 when the fader does, and 0 likewise); the gap shrinks in proportion, and once a move
      reaches or passes the value (exactly, no tolerance, so the value never steps against the
      fader's direction; at the latest at the end of the travel) the fader's position applies and
      it follows. A message that does not move the fader gives ``None``.

    The first message with no known fader position (after start; ``sync`` keeps the last known
    position, since the fader did not move): under ``pickup`` and ``scale`` it applies if it is
    within the tolerance of the value, else it gives ``None`` and is remembered as the position to
    move from (a fader far from the value does not make the parameter jump when touched). With no
    known value (created with ``current=None`` and never synced) the fader follows at once.
    """

    def __init__(
        self,
        mode: TakeoverMode = TakeoverMode.PICKUP,
        current: float | None = None,
        tolerance: float = TAKEOVER_TOLERANCE,
    ) -> None:
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance {tolerance!r} is not allowed: allowed: a number in 0..1 (not 1)")
        self.mode = mode
        self.tolerance = tolerance
        self._value: float | None = None if current is None else check_unit(current, "current value")
        self._fader: float | None = None
        self._engaged = current is None

    @property
    def value(self) -> float | None:
        """The parameter's normalised value as this binding knows it (``None``: not known)."""
        return self._value

    @property
    def fader(self) -> float | None:
        """The fader's last position (``None``: no message yet)."""
        return self._fader

    @property
    def engaged(self) -> bool:
        """Whether the fader drives the value now (picked up, or no value to pick up)."""
        return self._engaged

    def sync(self, current: float) -> None:
        """The parameter changed from elsewhere to ``current`` (0..1): re-arm the takeover."""
        self._value = check_unit(current, "current value")
        self._engaged = self._fader is not None and abs(self._fader - self._value) <= self.tolerance

    def _follow(self, physical: float) -> float:
        self._engaged = True
        self._value = physical
        self._fader = physical
        return physical

    def feed(self, physical: float) -> float | None:
        """The fader moved to ``physical`` (0..1): the normalised value to apply, or ``None``."""
        physical = check_unit(physical, "fader position")
        value, previous = self._value, self._fader
        if self.mode is TakeoverMode.JUMP or self._engaged or value is None:
            return self._follow(physical)
        if previous is None:
            if abs(physical - value) <= self.tolerance:
                return self._follow(physical)
            self._fader = physical
            return None
        low, high = min(previous, physical), max(previous, physical)
        self._fader = physical
        if self.mode is TakeoverMode.PICKUP:
            if low - self.tolerance <= value <= high + self.tolerance:
                return self._follow(physical)
            return None
        # scale: met when the fader reaches or passes the value (exactly: no tolerance, so the
        # value never steps against the fader's direction); at the latest at the end of the travel
        if physical == previous:
            return None
        if low <= value <= high:
            return self._follow(physical)
        if physical > previous:
            moved = value + (physical - previous) * (1.0 - value) / (1.0 - previous)
        else:
            moved = value - (previous - physical) * value / previous
        moved = min(1.0, max(0.0, moved))
        if abs(moved - physical) <= 1e-9:  # met at the end of the travel
            return self._follow(physical)
        self._value = moved
        return moved


# ---------------------------------------------------------------------------------------------
# Notes and buttons


def note_pressed(note_on: bool, velocity: int) -> bool:
    """Whether a note message is a press: a note on with velocity > 0 (velocity 0 is a note off)."""
    return note_on and check_data(velocity, "velocity") > 0


def cc_pressed(value: int) -> bool:
    """Whether a button sending CCs is pressed: 64..127 on, 0..63 off (the spec's switch CCs)."""
    return check_data(value, "CC value") >= 64


class SwitchMode(Enum):
    """How a button (a note, or a CC through ``cc_pressed``) drives a boolean or an action.

    ``feed(pressed, current)`` takes whether the message is a press (``note_pressed``: a note on
    with velocity 0 is a release) and the target's current state, and returns the new state or
    ``None`` (nothing to apply):

    - ``toggle``: a press flips ``current``; a release does nothing.
    - ``momentary``: on (``True``) while held: a press gives ``True``, a release ``False``.
    - ``trigger``: a press fires (``True``: run the action once); a release does nothing.
    """

    TOGGLE = "toggle"
    MOMENTARY = "momentary"
    TRIGGER = "trigger"

    def feed(self, note_on: bool, current: bool) -> bool | None:
        """The new state for a press (``note_on=True``) or a release, or ``None`` (nothing to do)."""
        if self is SwitchMode.MOMENTARY:
            return note_on
        if not note_on:
            return None
        return not current if self is SwitchMode.TOGGLE else True
