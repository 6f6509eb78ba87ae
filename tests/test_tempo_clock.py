"""TempoClock and Quantum with a fake clock: beats, bars, phase, tempo changes, boundaries."""

from __future__ import annotations

import itertools
import math
import threading

import pytest

from engine.tempo.clock import MAX_BPM, MIN_BPM, Quantum, TempoClock


class FakeNow:
    """A monotonic clock that moves only when told (seconds)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_quantum_lengths_in_beats():
    assert [q.beats(4) for q in Quantum] == [0.0, 1.0, 4.0, 8.0, 16.0]
    assert [q.beats(3) for q in Quantum] == [0.0, 1.0, 3.0, 6.0, 12.0]
    assert Quantum("2bars") is Quantum.TWO_BARS


def test_beat_bar_phase_at_120_bpm():
    clock = TempoClock(120.0, now=FakeNow(), origin=10.0)
    assert clock.seconds_per_beat == pytest.approx(0.5)
    assert clock.beat(10.0) == 0.0
    assert clock.beat(11.25) == pytest.approx(2.5)
    assert clock.bar(14.0) == pytest.approx(2.0)
    assert clock.phase(11.25) == pytest.approx(0.5)
    assert clock.phase(11.25, beats=4) == pytest.approx(0.625)
    assert clock.beat(9.0) == pytest.approx(-2.0)
    assert clock.phase(9.75) == pytest.approx(0.5)  # before the origin: still in [0, 1)


def test_reads_use_the_injected_now():
    now = FakeNow(100.0)
    clock = TempoClock(60.0, now=now)  # origin = now()
    now.t = 103.5
    assert clock.beat() == pytest.approx(3.5)
    assert clock.phase() == pytest.approx(0.5)
    assert clock.bar() == pytest.approx(3.5 / 4)


def test_phase_is_always_below_one():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    assert clock.phase(-1e-17) < 1.0
    assert clock.phase(-1e-17, beats=4) < 1.0


def test_set_bpm_keeps_the_beat_continuous():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    before = clock.beat(3.3)
    clock.set_bpm(90.0, 3.3)
    assert clock.beat(3.3) == pytest.approx(before)
    assert clock.phase(3.3) == pytest.approx(before % 1.0)
    # after the change, beats advance at 90 bpm: 1.5 beats per second
    assert clock.beat(5.3) - clock.beat(3.3) == pytest.approx(3.0)
    assert clock.seconds_per_beat == pytest.approx(60 / 90)


def test_set_bpm_on_beat_moves_the_phase_to_the_nearest_whole_beat():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    clock.set_bpm(100.0, 2.1, on_beat=True)  # beat 4.2 -> 4
    assert clock.beat(2.1) == pytest.approx(4.0)
    assert clock.beat(2.7) == pytest.approx(5.0)


def test_resync_makes_now_the_downbeat_of_bar_zero():
    now = FakeNow(50.0)
    clock = TempoClock(128.0, now=now, origin=0.0)
    now.t = 51.234
    clock.resync()
    assert clock.beat() == 0.0
    assert clock.bar(51.234 + 4 * 60 / 128) == pytest.approx(1.0)
    assert clock.bpm == 128.0


def test_set_beat_sets_position_and_tempo():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    clock.set_beat(17.25, t=5.0, bpm=140.0)
    assert clock.beat(5.0) == 17.25
    assert clock.beat(5.0 + 60 / 140) == pytest.approx(18.25)
    with pytest.raises(ValueError, match=r"beat nan .*finite"):
        clock.set_beat(math.nan, 5.0)


def test_beats_per_bar_changes_bars_not_beats():
    clock = TempoClock(120.0, beats_per_bar=3, now=FakeNow(), origin=0.0)
    assert clock.bar(3.0) == pytest.approx(2.0)  # 6 beats, 3 per bar
    clock.set_beats_per_bar(4, 3.0)
    assert clock.beat(3.0) == pytest.approx(6.0)
    assert clock.bar(3.0) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("t", "quantum", "expected"),
    [
        (1.1, Quantum.OFF, 1.1),
        (1.1, Quantum.BEAT, 1.5),
        (1.1, Quantum.BAR, 2.0),
        (2.0, Quantum.BAR, 2.0),  # on a boundary: that boundary
        (2.01, Quantum.BAR, 4.0),
        (1.1, Quantum.TWO_BARS, 4.0),
        (4.5, Quantum.TWO_BARS, 8.0),
        (0.3, Quantum.FOUR_BARS, 8.0),
        (-0.3, Quantum.BAR, 0.0),
    ],
)
def test_next_boundary_at_120_bpm(t, quantum, expected):
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)  # one bar = 2 s
    assert clock.next_boundary(t, quantum) == pytest.approx(expected)


def test_next_boundary_after_a_tempo_change_and_with_strings():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    clock.set_bpm(60.0, 1.0)  # beat 2 at t=1, then one beat per second
    assert clock.next_boundary(1.2, Quantum.BAR) == pytest.approx(3.0)  # beat 4
    assert clock.next_boundary(1.2, "2bars") == pytest.approx(7.0)  # beat 8


def test_unknown_quantum_names_the_allowed_ones():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    allowed = r"off \| beat \| bar \| 2bars \| 4bars"
    with pytest.raises(ValueError, match=rf"quantum '3bars' is not allowed: {allowed}"):
        clock.next_boundary(1.0, "3bars")


def test_next_boundary_is_never_before_t_despite_rounding():
    clock = TempoClock(137.0, now=FakeNow(), origin=0.123456789)
    for k in range(1, 200):
        t = clock.state().time_at(float(k))
        assert clock.next_boundary(t, Quantum.BEAT) >= t
        assert clock.next_boundary(t, Quantum.BEAT) - t < 1e-6


def test_boundary_index_counts_crossings():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    frames = [i / 60 for i in range(60 * 4 + 1)]  # 4 s at 60 fps = 8 beats = 2 bars
    beats = [clock.boundary_index(t, Quantum.BEAT) for t in frames]
    crossings = sum(1 for a, b in itertools.pairwise(beats) if b != a)
    assert crossings == 8
    assert clock.boundary_index(3.99, Quantum.BAR) == 1
    assert clock.boundary_index(4.0, Quantum.BAR) == 2
    assert clock.boundary_index(-0.1, Quantum.BEAT) == -1
    with pytest.raises(ValueError, match=r"quantum 'off' has no boundaries: allowed beat \| bar"):
        clock.boundary_index(1.0, Quantum.OFF)


@pytest.mark.parametrize("bad", [MIN_BPM - 0.5, MAX_BPM + 1, 0.0, -120.0, math.nan, math.inf])
def test_bpm_out_of_range_is_refused_and_changes_nothing(bad):
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    with pytest.raises(ValueError, match=r"bpm .* is out of range: allowed 20\.\.999"):
        clock.set_bpm(bad, 1.0)
    assert clock.bpm == 120.0
    assert clock.beat(1.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="out of range"):
        TempoClock(bad)


def test_range_ends_are_allowed():
    clock = TempoClock(MIN_BPM, now=FakeNow(), origin=0.0)
    clock.set_bpm(MAX_BPM, 0.0)
    assert clock.bpm == 999.0


@pytest.mark.parametrize("bad", [0, 33, 2.5, True])
def test_bad_beats_per_bar_is_refused(bad):
    with pytest.raises(ValueError, match=rf"beats_per_bar {bad!r} is not allowed: an integer 1\.\.32"):
        TempoClock(120.0, beats_per_bar=bad)


def test_bad_phase_period_is_refused():
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    with pytest.raises(ValueError, match=r"beats 0 is not allowed"):
        clock.phase(1.0, beats=0)


def test_concurrent_writers_and_readers_see_consistent_states():
    """Readers never see a torn state: beat(t) at the write time equals what the writer set."""
    clock = TempoClock(120.0, now=FakeNow(), origin=0.0)
    errors: list[str] = []

    def writer(offset: int) -> None:
        for i in range(2000):
            clock.set_beat(float(i), t=float(offset * 10_000 + i), bpm=60.0 + (i % 100))

    def reader() -> None:
        for _ in range(4000):
            state = clock.state()
            if state.beat_at(state.time) != state.beat or not 60.0 <= state.bpm < 160.0:
                errors.append(repr(state))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert clock.state().beat == 1999.0
