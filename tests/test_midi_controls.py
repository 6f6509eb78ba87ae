"""engine.midi.controls: 14-bit pairs, relative encoders, curves, soft takeover, switches, coalescing."""

from __future__ import annotations

import itertools

import pytest

from engine.midi.controls import (
    VALUE14_MAX,
    Curve,
    Pair14,
    RelativeEncoding,
    SwitchMode,
    Takeover,
    TakeoverMode,
    cc_pressed,
    decode_relative,
    from_range,
    normalise7,
    normalise14,
    note_pressed,
    shape,
    to_range,
    unshape,
)


class FakeNow:
    """A monotonic clock that moves only when told (seconds)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- 14-bit pairs ------------------------------------------------------------------------------


def test_msb_only_gives_seven_bit_resolution():
    pair = Pair14()
    assert pair.value is None
    assert pair.feed_msb(64) == 64 << 7
    assert pair.feed_msb(127) == 127 << 7
    assert normalise14(pair.feed_msb(0) or 0) == 0.0


def test_msb_then_lsb_completes_and_msb_resets_lsb():
    pair = Pair14()
    assert pair.feed_lsb(5) is None  # no MSB yet: the coarse part is unknown
    assert pair.feed_msb(64) == 8192
    assert pair.feed_lsb(1) == 8193
    assert pair.feed_lsb(100) == 8192 + 100  # a fine adjustment: the LSB alone
    assert pair.feed_msb(65) == 65 << 7  # a new MSB resets the LSB to 0
    assert pair.value == 65 << 7


def test_full_scale_pair_is_exactly_one():
    pair = Pair14()
    pair.feed_msb(127)
    value = pair.feed_lsb(127)
    assert value == VALUE14_MAX == 16383
    assert normalise14(value) == 1.0
    assert normalise14(0) == 0.0
    assert normalise7(127) == 1.0 and normalise7(0) == 0.0


def test_lsb_first_pairs_within_the_window():
    now = FakeNow()
    pair = Pair14(lsb_first=True, window_s=0.02, now=now)
    assert pair.feed_lsb(3) is None  # held, nothing applied with the old MSB
    now.t += 0.001
    assert pair.feed_msb(10) == 10 << 7 | 3
    assert pair.feed_lsb(127) is None
    assert pair.value == 10 << 7 | 3  # the held LSB has not touched the value
    now.t += 0.001
    assert pair.feed_msb(127) == 16383
    # a held LSB is used once: the next MSB alone resets the LSB to 0
    assert pair.feed_msb(20) == 20 << 7


def test_lsb_first_stale_lsb_is_dropped():
    now = FakeNow()
    pair = Pair14(lsb_first=True, window_s=0.02, now=now)
    pair.feed_lsb(99)
    now.t += 0.5
    assert pair.feed_msb(10) == 10 << 7


def test_pair_refuses_bad_bytes():
    pair = Pair14()
    for bad in (128, -1, 1.0, True, "7"):
        with pytest.raises(ValueError, match=r"0\.\.127"):
            pair.feed_msb(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"LSB"):
            pair.feed_lsb(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16383"):
        normalise14(16384)


# --- relative encoders -------------------------------------------------------------------------

TABLES = {
    RelativeEncoding.TWOS_COMPLEMENT: {0: 0, 1: 1, 2: 2, 63: 63, 64: -64, 65: -63, 126: -2, 127: -1},
    RelativeEncoding.BINARY_OFFSET: {64: 0, 65: 1, 66: 2, 127: 63, 63: -1, 62: -2, 1: -63, 0: -64},
    RelativeEncoding.SIGN_MAGNITUDE: {0: 0, 1: 1, 63: 63, 64: 0, 65: -1, 66: -2, 127: -63},
}


@pytest.mark.parametrize("encoding", list(RelativeEncoding))
def test_relative_encoding_tables(encoding):
    for value, step in TABLES[encoding].items():
        assert decode_relative(value, encoding) == step, (encoding, value)


@pytest.mark.parametrize("encoding", list(RelativeEncoding))
def test_relative_encodings_cover_every_byte(encoding):
    steps = [decode_relative(v, encoding) for v in range(128)]
    assert all(-64 <= s <= 63 for s in steps)
    ups = sorted(s for s in steps if s > 0)
    assert ups == list(range(1, 64))  # each step +1..+63 has exactly one byte


def test_relative_refuses_bad_values():
    for bad in (128, -1, 3.0, None, True):
        with pytest.raises(ValueError, match=r"relative encoder value .* allowed: an int in 0\.\.127"):
            decode_relative(bad, RelativeEncoding.TWOS_COMPLEMENT)  # type: ignore[arg-type]
    assert RelativeEncoding("binary_offset") is RelativeEncoding.BINARY_OFFSET


# --- curves and ranges -------------------------------------------------------------------------


@pytest.mark.parametrize("curve", list(Curve))
def test_curves_are_increasing_with_fixed_endpoints(curve):
    xs = [i / 1000 for i in range(1001)]
    ys = [shape(x, curve) for x in xs]
    assert ys[0] == 0.0 and ys[-1] == 1.0
    assert all(b > a for a, b in itertools.pairwise(ys))
    assert all(0.0 <= y <= 1.0 for y in ys)
    for x in xs:
        assert unshape(shape(x, curve), curve) == pytest.approx(x, abs=1e-12)


def test_curve_shapes():
    assert shape(0.5, Curve.LINEAR) == 0.5
    assert shape(0.5, Curve.EXP) == pytest.approx(0.1192, abs=1e-4)  # fine at the bottom
    assert shape(0.5, Curve.LOG) == pytest.approx(0.8313, abs=1e-4)  # fine at the top
    assert shape(shape(0.3, Curve.EXP), Curve.LOG) == pytest.approx(0.3)
    assert shape(-0.5, Curve.EXP) == 0.0 and shape(1.5, Curve.LOG) == 1.0  # clamped
    with pytest.raises(ValueError, match="curve input"):
        shape(float("nan"), Curve.LINEAR)


def test_ranges_and_inversion():
    assert to_range(0.0, 1.0, 10.0) == 1.0
    assert to_range(1.0, 1.0, 10.0) == 10.0
    assert to_range(0.5, 0.0, 20.0) == 10.0
    assert to_range(0.0, 10.0, 1.0) == 10.0  # low > high inverts
    assert to_range(1.0, 10.0, 1.0) == 1.0
    assert to_range(0.25, 10.0, 2.0) == 8.0
    assert to_range(2.0, 0.0, 5.0) == 5.0  # clamped
    assert from_range(10.0, 0.0, 20.0) == 0.5
    assert from_range(8.0, 10.0, 2.0) == 0.25
    assert from_range(-3.0, 0.0, 20.0) == 0.0 and from_range(99.0, 0.0, 20.0) == 1.0  # clamped
    assert from_range(3.0, 3.0, 3.0) == 0.0
    for low, high in ((0.0, 20.0), (-1.0, 1.0), (7.5, 0.5)):
        for x in (0.0, 0.1, 0.5, 0.9, 1.0):
            assert from_range(to_range(x, low, high), low, high) == pytest.approx(x)


# --- soft takeover -----------------------------------------------------------------------------


def test_pickup_waits_until_the_fader_reaches_the_value():
    t = Takeover(TakeoverMode.PICKUP)
    assert t.feed(0.2) == 0.2  # no known value: follows at once
    t.sync(0.6)  # a scene set it to 0.6
    assert not t.engaged
    assert t.feed(0.3) is None
    assert t.feed(0.5) is None
    assert t.feed(0.6) == 0.6  # reached
    assert t.engaged
    assert t.feed(0.4) == 0.4  # follows
    assert t.feed(0.41) == 0.41


def test_pickup_catches_a_fader_that_jumps_over_the_value():
    t = Takeover(TakeoverMode.PICKUP, current=0.5)
    assert t.feed(0.1) is None  # first message, far away: waits
    assert t.feed(0.3) is None
    assert t.feed(0.9) == 0.9  # crossed 0.5 between two messages: caught
    assert t.feed(0.8) == 0.8
    t.sync(0.2)  # from above, downward over it
    assert t.feed(0.7) is None
    assert t.feed(0.05) == 0.05


def test_pickup_tolerance_is_one_seven_bit_step():
    t = Takeover(TakeoverMode.PICKUP, current=0.5)
    assert t.feed(0.5 + 2 / 127) is None
    assert t.feed(0.5 + 1.5 / 127) is None  # moved, still not within a step
    t = Takeover(TakeoverMode.PICKUP, current=0.5)
    assert t.feed(0.5 + 0.9 / 127) == pytest.approx(0.5 + 0.9 / 127)  # first message within a step


def test_pickup_rearms_after_sync():
    t = Takeover(TakeoverMode.PICKUP, current=0.5)
    t.feed(0.5)
    assert t.engaged and t.feed(0.7) == 0.7
    t.sync(0.2)  # OSC moved it; the fader is still at 0.7
    assert not t.engaged and t.value == 0.2 and t.fader == 0.7
    assert t.feed(0.75) is None  # moving away
    assert t.feed(0.5) is None
    assert t.feed(0.19) == 0.19  # passed 0.2
    t.sync(0.19)  # synced to where the fader is: stays engaged
    assert t.engaged and t.feed(0.3) == 0.3


def test_jump_always_applies():
    t = Takeover(TakeoverMode.JUMP, current=0.5)
    assert t.feed(0.1) == 0.1
    t.sync(0.9)
    assert t.feed(0.12) == 0.12
    assert t.value == 0.12


def test_scale_moves_toward_the_fader_and_follows_once_it_passes():
    t = Takeover(TakeoverMode.SCALE, current=0.5)
    assert t.feed(0.2) is None  # first message, no direction yet
    # upward from f=0.2, v=0.5: v + (f' - f)(1 - v)/(1 - f)
    assert t.feed(0.4) == pytest.approx(0.5 + 0.2 * 0.5 / 0.8)  # 0.625
    assert not t.engaged
    # downward from f=0.4, v=0.625: v - (f - f') v / f
    assert t.feed(0.3) == pytest.approx(0.625 - 0.1 * 0.625 / 0.4)  # 0.46875
    assert t.feed(0.3) is None  # no movement, nothing to apply
    assert t.feed(0.6) == 0.6  # passed the value: follows
    assert t.engaged
    assert t.feed(0.55) == 0.55


def test_scale_meets_at_the_end_of_the_travel():
    t = Takeover(TakeoverMode.SCALE, current=0.2)
    t.feed(0.5)
    assert t.feed(0.75) == pytest.approx(0.2 + 0.25 * 0.8 / 0.5)  # 0.6: faster than the fader
    assert t.feed(1.0) == 1.0  # both at the top
    assert t.engaged
    assert t.feed(0.9) == 0.9


@pytest.mark.parametrize("start", [0.1, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_scale_is_monotonic_and_meets_the_fader(start, direction):
    t = Takeover(TakeoverMode.SCALE, current=start)
    assert t.feed(64 / 127) is None
    steps = range(63, -1, -1) if direction == "down" else range(65, 128)
    applied = [t.feed(x / 127) for x in steps]
    assert None not in applied
    pairs = list(itertools.pairwise([start, *applied]))
    if direction == "down":
        assert all(b <= a for a, b in pairs)  # never against the fader's direction
    else:
        assert all(b >= a for a, b in pairs)
    assert t.engaged and applied[-1] == (0.0 if direction == "down" else 1.0)


def test_scale_meets_when_the_fader_passes_the_value_then_follows_and_rearms():
    t = Takeover(TakeoverMode.SCALE, current=0.3)
    t.feed(0.5)
    values = [t.feed(x / 100) for x in range(49, -1, -1)]  # fader down to 0
    applied = [v for v in values if v is not None]
    assert all(b <= a for a, b in itertools.pairwise(applied))  # the value only goes down
    engaged_at = next(i for i, v in enumerate(values) if v == (49 - i) / 100)
    assert 0 < 49 - engaged_at < 5  # met before the end: the fader passed the value
    assert t.feed(0.25) == 0.25
    t.sync(0.8)
    assert not t.engaged
    assert t.feed(0.5) == pytest.approx(0.8 + 0.25 * 0.2 / 0.75)


def test_takeover_refuses_bad_positions():
    t = Takeover()
    for bad in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="fader position"):
            t.feed(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="current value"):
        t.sync(2.0)


# --- notes and buttons -------------------------------------------------------------------------


def test_note_and_cc_presses():
    assert note_pressed(True, 100)
    assert not note_pressed(True, 0)  # velocity 0 note on is a note off
    assert not note_pressed(False, 64)
    assert cc_pressed(127) and cc_pressed(64)
    assert not cc_pressed(63) and not cc_pressed(0)
    with pytest.raises(ValueError, match="velocity"):
        note_pressed(True, 128)


def test_toggle():
    mode = SwitchMode.TOGGLE
    assert mode.feed(True, False) is True
    assert mode.feed(False, True) is None  # the release does nothing
    assert mode.feed(True, True) is False
    assert mode.feed(note_pressed(True, 0), False) is None  # velocity 0: a release


def test_momentary():
    mode = SwitchMode.MOMENTARY
    assert mode.feed(True, False) is True
    assert mode.feed(True, True) is True
    assert mode.feed(False, True) is False


def test_trigger():
    mode = SwitchMode.TRIGGER
    assert mode.feed(True, False) is True
    assert mode.feed(True, True) is True  # fires every press
    assert mode.feed(False, False) is None
    assert SwitchMode("trigger") is SwitchMode.TRIGGER
