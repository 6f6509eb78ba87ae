"""ADSR envelopes: the level at chosen times, retrigger without a jump, one-shots, bad times."""

from __future__ import annotations

import pytest

from engine.modulation.envelope import Envelope, TimeUnit


def levels(envelope, times):
    return [envelope.level(t) for t in times]


def test_adsr_shape_at_chosen_times():
    env = Envelope(attack=1.0, decay=2.0, sustain=0.5, release=4.0)
    assert env.level(0.0) == 0.0  # never triggered
    env.trigger(10.0)
    assert levels(env, [10.0, 10.5, 11.0, 12.0, 13.0, 20.0]) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.5])
    env.release(20.0)
    assert levels(env, [20.0, 21.0, 23.0, 24.0, 30.0]) == pytest.approx([0.5, 0.375, 0.125, 0.0, 0.0])


def test_release_during_attack_falls_from_the_level_reached():
    env = Envelope(attack=1.0, decay=1.0, sustain=1.0, release=1.0)
    env.trigger(0.0)
    env.release(0.4)
    assert levels(env, [0.4, 0.9, 1.4]) == pytest.approx([0.4, 0.2, 0.0])


def test_retrigger_while_releasing_starts_from_the_current_level():
    env = Envelope(attack=1.0, decay=0.0, sustain=1.0, release=2.0)
    env.trigger(0.0)
    env.release(2.0)
    assert env.level(3.0) == pytest.approx(0.5)
    env.trigger(3.0)
    assert env.level(3.0) == pytest.approx(0.5)  # no jump
    assert levels(env, [3.25, 3.5, 4.0]) == pytest.approx([0.75, 1.0, 1.0])  # the attack's slope


def test_retrigger_while_held_keeps_the_level():
    env = Envelope(attack=1.0, decay=1.0, sustain=0.4, release=1.0)
    env.trigger(0.0)
    env.trigger(5.0)
    assert env.level(5.0) == pytest.approx(0.4)
    assert env.level(5.3) == pytest.approx(0.7)


def test_zero_times_are_steps():
    env = Envelope(attack=0.0, decay=0.0, sustain=0.6, release=0.0)
    env.trigger(1.0)
    assert env.level(1.0) == pytest.approx(0.6)
    env.release(2.0)
    assert env.level(2.0) == 0.0


def test_one_shot_releases_by_itself_after_the_hold():
    env = Envelope(attack=0.0, decay=0.0, sustain=1.0, release=0.5, unit=TimeUnit.BEATS, hold=0.25)
    env.trigger(4.0)
    assert levels(env, [4.0, 4.2, 4.25, 4.5, 4.75, 5.0]) == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0, 0.0])
    env.trigger(5.0)  # the next beat fires it again
    assert env.level(5.1) == pytest.approx(1.0)


def test_release_before_any_trigger_does_nothing():
    env = Envelope()
    env.release(1.0)
    env.trigger(2.0)
    assert env.level(2.0 + env.attack) == pytest.approx(1.0)


def test_time_unit_picks_the_clock():
    assert TimeUnit.SECONDS.pick(3.0, 8.0) == 3.0
    assert TimeUnit.BEATS.pick(3.0, 8.0) == 8.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attack": -1.0}, "envelope attack -1.0"),
        ({"decay": float("inf")}, "envelope decay inf"),
        ({"release": "slow"}, "envelope release 'slow'"),
        ({"hold": -0.1}, "envelope hold -0.1"),
        ({"sustain": 1.5}, "envelope sustain 1.5"),
    ],
)
def test_bad_times_name_the_value_and_what_is_allowed(kwargs, named):
    with pytest.raises(ValueError, match="allowed: ") as caught:
        Envelope(**kwargs)
    assert named in str(caught.value)
