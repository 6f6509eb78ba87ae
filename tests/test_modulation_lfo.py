"""Shapes, rates and LFOs: values at known phases and beats, ranges, periodicity, parsing."""

from __future__ import annotations

import itertools
import math

import pytest

from engine.modulation.lfo import Lfo
from engine.modulation.rate import Rate, RateUnit, parse_rate
from engine.modulation.shapes import Shape, random_unit, value

PHASES = [i / 64 for i in range(64)]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (Shape.SINE, [0.0, 1.0, 0.0, -1.0]),
        (Shape.TRIANGLE, [0.0, 1.0, 0.0, -1.0]),
        (Shape.SAW, [-1.0, -0.5, 0.0, 0.5]),
        (Shape.SQUARE, [1.0, 1.0, -1.0, -1.0]),
    ],
)
def test_shapes_at_quarter_phases(shape, expected):
    got = [value(shape, phase) for phase in (0.0, 0.25, 0.5, 0.75)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", list(Shape))
def test_every_shape_stays_in_range_and_is_deterministic(shape):
    for cycle in range(-3, 20):
        for phase in PHASES:
            v = value(shape, phase, cycle, seed=7)
            assert -1.0 <= v <= 1.0
            assert v == value(shape, phase, cycle, seed=7)


@pytest.mark.parametrize("shape", [Shape.SINE, Shape.TRIANGLE, Shape.SAW, Shape.SQUARE])
def test_periodic_shapes_repeat_every_cycle(shape):
    assert [value(shape, p, 0) for p in PHASES] == [value(shape, p, 5) for p in PHASES]


def test_sample_and_hold_is_constant_within_a_cycle_and_seeded():
    held = [value(Shape.SAMPLE_HOLD, p, 3, seed=11) for p in PHASES]
    assert len(set(held)) == 1
    assert held[0] == random_unit(11, 3)
    per_cycle = [value(Shape.SAMPLE_HOLD, 0.5, c, seed=11) for c in range(32)]
    assert len(set(per_cycle)) == 32  # a new value every cycle
    assert per_cycle != [value(Shape.SAMPLE_HOLD, 0.5, c, seed=12) for c in range(32)]
    assert min(per_cycle) < -0.3 and max(per_cycle) > 0.3  # spread over the range


def test_random_values_are_spread_evenly():
    values = [random_unit(1, c) for c in range(20000)]
    assert sum(values) / len(values) == pytest.approx(0.0, abs=0.02)
    assert sum(v * v for v in values) / len(values) == pytest.approx(1 / 3, abs=0.01)


def test_smooth_random_joins_the_held_values_continuously():
    for cycle in range(10):
        assert value(Shape.SMOOTH_RANDOM, 0.0, cycle, 5) == pytest.approx(random_unit(5, cycle))
        end_of_cycle = value(Shape.SMOOTH_RANDOM, 1.0 - 1e-9, cycle, 5)
        assert end_of_cycle == pytest.approx(value(Shape.SMOOTH_RANDOM, 0.0, cycle + 1, 5), abs=1e-9)
    # cosine easing: halfway is the mean of the two ends
    a, b = random_unit(5, 2), random_unit(5, 3)
    assert value(Shape.SMOOTH_RANDOM, 0.5, 2, 5) == pytest.approx((a + b) / 2)


@pytest.mark.parametrize(
    ("text", "unit", "period"),
    [
        ("1bar", RateUnit.BARS, 1.0),
        ("2bars", RateUnit.BARS, 2.0),
        ("1beat", RateUnit.BEATS, 1.0),
        ("0.5beat", RateUnit.BEATS, 0.5),
        ("1/4beat", RateUnit.BEATS, 0.25),
        ("1/16bar", RateUnit.BARS, 1 / 16),
        ("3 beats", RateUnit.BEATS, 3.0),
        ("0.5hz", RateUnit.SECONDS, 2.0),
        ("2Hz", RateUnit.SECONDS, 0.5),
        ("4", RateUnit.SECONDS, 0.25),
        (0.25, RateUnit.SECONDS, 4.0),
        (2, RateUnit.SECONDS, 0.5),
    ],
)
def test_rates_parse(text, unit, period):
    rate = parse_rate(text)
    assert rate == Rate(unit, pytest.approx(period))
    assert parse_rate(str(rate)) == rate  # the canonical text reads back


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("fast", "is not a rate"),
        ("1 furlong", "is not a rate"),
        ("-1bar", "is not a rate"),
        ("0bar", "is not positive"),
        ("1/0beat", "divides by zero"),
        ("1e3hz", "is not a rate"),
        ("500hz", "faster than 100 Hz"),
        ("2000bars", "too slow"),
        (0, "is not positive"),
        (float("nan"), "is not positive"),
        (True, "is not a rate"),
        (None, "is not a rate"),
    ],
)
def test_bad_rates_name_the_text_and_what_is_allowed(text, why):
    with pytest.raises(ValueError, match=why) as caught:
        parse_rate(text)
    assert repr(text)[:10] in str(caught.value)
    assert "allowed: " in str(caught.value) and "'1/4beat'" in str(caught.value)


def test_cycles_come_from_beats_for_musical_rates_and_from_seconds_for_hz():
    # 120 BPM: a beat is 0.5 s, a 4/4 bar 2 s; seconds and beats disagree on purpose.
    assert parse_rate("1bar").cycles(seconds=99.0, beats=6.0, beats_per_bar=4) == pytest.approx(1.5)
    assert parse_rate("1bar").cycles(seconds=99.0, beats=6.0, beats_per_bar=3) == pytest.approx(2.0)
    assert parse_rate("1/4beat").cycles(seconds=99.0, beats=6.0) == pytest.approx(24.0)
    assert parse_rate("0.5hz").cycles(seconds=3.0, beats=1000.0) == pytest.approx(1.5)


def test_lfo_sine_of_one_bar_at_120_bpm():
    lfo = Lfo(Shape.SINE, parse_rate("1bar"), depth=0.3)
    # 120 BPM: beat b is at b / 2 seconds; a quarter of a bar is beat 1.
    beats = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    got = [lfo.sample(b / 2, b, 4) for b in beats]
    assert got == pytest.approx([0.0, 0.3, 0.0, -0.3, 0.0, 0.3], abs=1e-12)


def test_lfo_phase_offset_and_negative_depth():
    lfo = Lfo(Shape.SINE, parse_rate("1beat"), depth=-2.0, phase_offset=0.25)
    assert lfo.sample(0.0, 0.0) == pytest.approx(-2.0)
    assert lfo.sample(0.0, 0.5) == pytest.approx(2.0)


def test_lfo_in_hz_follows_seconds():
    lfo = Lfo(Shape.SQUARE, parse_rate("0.5hz"), depth=1.0)
    assert [lfo.sample(s, 0.0) for s in (0.1, 0.9, 1.1, 1.9, 2.1)] == [1.0, 1.0, -1.0, -1.0, 1.0]


def test_lfo_period_is_2_seconds_for_one_bar_at_120_bpm():
    lfo = Lfo(Shape.SINE, parse_rate("1bar"), depth=1.0)
    fps = 60
    samples = [lfo.sample(i / fps, 2.0 * i / fps) for i in range(fps * 10)]
    rising_zero_crossings = [i for i in range(1, len(samples)) if samples[i - 1] < 0 <= samples[i]]
    periods = [(b - a) / fps for a, b in itertools.pairwise(rising_zero_crossings)]
    assert periods and all(p == pytest.approx(2.0, abs=1 / fps) for p in periods)


def test_sample_and_hold_lfo_changes_only_at_cycle_boundaries():
    lfo = Lfo(Shape.SAMPLE_HOLD, parse_rate("1beat"), depth=1.0, seed=3)
    within = {lfo.sample(0.0, 2.0 + k / 10) for k in range(10)}
    assert len(within) == 1
    assert lfo.sample(0.0, 3.0) != lfo.sample(0.0, 2.99)
    assert math.isclose(lfo.sample(0.0, 2.5), random_unit(3, 2))
