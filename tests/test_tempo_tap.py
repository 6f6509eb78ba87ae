"""TapTempo from tap times (no sleeps): series, robustness, bounces, and following it with a clock."""

from __future__ import annotations

import random

import pytest

from engine.tempo.clock import TempoClock
from engine.tempo.tap import TapTempo


def taps_at(times: list[float], tapper: TapTempo | None = None) -> TapTempo:
    tapper = tapper or TapTempo()
    for t in times:
        tapper.tap(t)
    return tapper


def test_four_taps_at_100_bpm_give_100():
    tapper = TapTempo()
    results = [tapper.tap(10.0 + 0.6 * k) for k in range(4)]
    assert results[0] is None
    last = results[-1]
    assert last is not None
    assert last.bpm == pytest.approx(100.0, abs=0.5)
    assert last.bpm == pytest.approx(100.0, abs=1e-9)
    assert last.beat_time == pytest.approx(11.8)
    assert (last.taps, last.intervals_used) == (4, 3)


def test_two_taps_are_enough_for_a_first_estimate():
    tapper = TapTempo()
    assert tapper.tap(0.0) is None
    assert tapper.estimate is None
    estimate = tapper.tap(0.5)
    assert estimate is not None and estimate is tapper.estimate
    assert estimate.bpm == pytest.approx(120.0)


def test_one_mistimed_tap_is_harmless():
    # the third tap 80 ms late: intervals 0.6, 0.68, 0.52, 0.6, 0.6
    tapper = taps_at([0.0, 0.6, 1.28, 1.8, 2.4, 3.0])
    assert tapper.estimate is not None
    assert tapper.estimate.bpm == pytest.approx(100.0, abs=0.5)
    # a tap 150 ms early: its two intervals disagree with the median and are left out
    tapper = taps_at([0.0, 0.6, 1.05, 1.8, 2.4, 3.0])
    assert tapper.estimate is not None
    assert tapper.estimate.bpm == pytest.approx(100.0, abs=1e-9)
    assert tapper.estimate.intervals_used == 3


def test_human_jitter_at_128_bpm():
    rng = random.Random(25)
    period = 60 / 128
    tapper = taps_at([5.0 + k * period + rng.gauss(0.0, 0.01) for k in range(9)])
    assert tapper.estimate is not None
    assert tapper.estimate.bpm == pytest.approx(128.0, abs=1.0)


def test_only_the_last_eight_intervals_count():
    slow = [0.6 * k for k in range(10)]  # 100 bpm
    fast = [slow[-1] + 0.5 * k for k in range(1, 10)]  # then 120 bpm, nine taps
    tapper = taps_at(slow + fast)
    assert tapper.estimate is not None
    assert tapper.estimate.bpm == pytest.approx(120.0)


def test_a_long_gap_starts_a_new_series():
    tapper = taps_at([0.0, 0.6, 1.2])
    assert tapper.tap(3.5) is None  # 2.3 s later: a new series, one tap so far
    estimate = tapper.tap(3.9)
    assert estimate is not None
    assert estimate.bpm == pytest.approx(150.0)
    assert estimate.taps == 2


def test_a_bounce_is_ignored():
    tapper = taps_at([0.0, 0.5, 0.52, 1.0])
    assert tapper.estimate is not None
    assert tapper.estimate.bpm == pytest.approx(120.0)
    assert tapper.estimate.taps == 3


def test_taps_out_of_order_are_refused():
    tapper = taps_at([1.0, 1.5])
    with pytest.raises(ValueError, match=r"tap time 1\.2 is before the previous tap 1\.5"):
        tapper.tap(1.2)
    assert tapper.estimate is not None and tapper.estimate.bpm == pytest.approx(120.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_gap_s": 0.0}, r"max_gap_s 0\.0 is not allowed: seconds in \(0\.060, 3\]"),
        ({"max_gap_s": 5.0}, r"max_gap_s 5\.0 is not allowed"),
        ({"max_intervals": 0}, r"max_intervals 0 is not allowed: an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TapTempo(**kwargs)


def test_tap_uses_the_injected_now_and_reset_forgets():
    now = [100.0]
    tapper = TapTempo(now=lambda: now[0])
    for _ in range(3):
        tapper.tap()
        now[0] += 0.4
    assert tapper.estimate is not None and tapper.estimate.bpm == pytest.approx(150.0)
    tapper.reset()
    assert tapper.estimate is None
    assert tapper.tap() is None


def test_the_clock_follows_the_taps_in_tempo_and_phase():
    clock = TempoClock(120.0, now=lambda: 0.0, origin=0.0)
    tapper = TapTempo()
    estimate = None
    for k in range(4):
        estimate = tapper.tap(7.13 + 0.6 * k)  # taps off the clock's beat grid
    assert estimate is not None
    clock.set_bpm(estimate.bpm, estimate.beat_time, on_beat=True)
    assert clock.bpm == pytest.approx(100.0, abs=0.5)
    assert clock.phase(estimate.beat_time) == pytest.approx(0.0, abs=1e-9)
    one_tap_later = clock.beat(estimate.beat_time + 0.6) - clock.beat(estimate.beat_time)
    assert one_tap_later == pytest.approx(1.0, abs=0.01)
    assert clock.beat(estimate.beat_time) == 18.0  # 8.93 s at 120 bpm = beat 17.86, nearest 18


def test_two_intervals_that_disagree_follow_the_newest_instead_of_failing():
    taps = TapTempo()
    taps.tap(0.0)
    taps.tap(0.4)
    estimate = taps.tap(1.2)  # 0.4 s then 0.8 s: both are further than 15 % from their mean
    assert estimate is not None and estimate.bpm == pytest.approx(75.0)
