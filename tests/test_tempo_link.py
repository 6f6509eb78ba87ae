"""The Link adapter's pure logic with a stand-in binding; the real binding only where installed."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from engine.tempo.clock import Quantum, TempoClock
from engine.tempo.extras import TempoSourceUnavailable
from engine.tempo.link import LinkSession, import_link, link_micros, read_session


class FakeState:
    """A Link timeline: beat 0 at ``origin_us`` on Link's clock, at ``bpm``."""

    def __init__(self, bpm: float, origin_us: int, playing: bool = False) -> None:
        self.bpm, self.origin_us, self.playing = bpm, origin_us, playing

    def tempo(self) -> float:
        return self.bpm

    def beatAtTime(self, micros: int, quantum: float) -> float:
        return (micros - self.origin_us) / 1e6 * self.bpm / 60.0

    def phaseAtTime(self, micros: int, quantum: float) -> float:
        return math.fmod(self.beatAtTime(micros, quantum), quantum) % quantum

    def isPlaying(self) -> bool:
        return self.playing

    def setTempo(self, *args: object) -> None:
        raise AssertionError("the adapter must never set the session's tempo")


class FakeClock:
    def __init__(self, micros: int) -> None:
        self.now_us = micros

    def micros(self) -> int:
        return self.now_us


class FakeLink:
    """The binding's ``Link`` over a fixed timeline; any commit fails the test."""

    state = FakeState(128.0, origin_us=5_000_000)
    link_now_us = 7_000_000
    created: list[FakeLink] = []  # noqa: RUF012

    def __init__(self, bpm: float) -> None:
        self.initial_bpm, self.enabled, self.peers = bpm, False, 2
        FakeLink.created.append(self)

    def clock(self) -> FakeClock:
        return FakeClock(self.link_now_us)

    def captureAppSessionState(self) -> FakeState:
        return self.state

    def numPeers(self) -> int:
        return self.peers

    def commitAppSessionState(self, state: object) -> None:
        raise AssertionError("the adapter must never commit a session state")

    commitSessionState = commitAppSessionState


class FakeBinding:
    Link = FakeLink


def test_our_time_maps_onto_links_clock():
    assert link_micros(10.5, 10.0, 7_000_000) == 7_500_000
    assert link_micros(9.75, 10.0, 7_000_000) == 6_750_000


def test_read_session_converts_time_and_reads_tempo_beat_phase():
    link = FakeLink(120.0)
    # our 100.0 s == Link's 7.0 s; at our 100.5 s Link is at 7.5 s: 2.5 s after beat 0 at 128 bpm
    reading = read_session(link, t=100.5, now_s=100.0, quantum=4.0)
    assert reading.bpm == 128.0
    assert reading.beat == pytest.approx(2.5 * 128 / 60)
    assert reading.phase == pytest.approx((2.5 * 128 / 60) % 4.0)
    assert (reading.peers, reading.playing, reading.quantum, reading.time) == (2, False, 4.0, 100.5)


def test_older_bindings_capture_with_captureSessionState():
    class OldLink:
        def clock(self) -> FakeClock:
            return FakeClock(1_000_000)

        def captureSessionState(self) -> FakeState:
            return FakeState(90.0, origin_us=0, playing=True)

        def numPeers(self) -> int:
            return 0

    reading = read_session(OldLink(), t=1.0, now_s=1.0, quantum=4.0)
    assert (reading.bpm, reading.beat, reading.playing) == (90.0, pytest.approx(1.5), True)


def test_session_joins_reads_and_drives_a_clock_without_writing():
    now = [100.0]
    FakeLink.created.clear()
    with LinkSession(quantum=4.0, now=lambda: now[0], binding=FakeBinding) as session:
        link = FakeLink.created[0]
        assert link.enabled
        clock = TempoClock(120.0, now=lambda: now[0], origin=0.0)
        reading = session.apply_to(clock)
        assert clock.bpm == 128.0
        assert clock.beat(100.0) == pytest.approx(reading.beat)
        assert clock.beat(100.0) == pytest.approx(2.0 * 128 / 60)  # Link's 7 s is 2 s after beat 0
        # the clock's bars line up with the session's (quantum = beats per bar)
        assert clock.phase(100.0, beats=4) == pytest.approx(reading.phase / 4)
        boundary = clock.next_boundary(100.0, Quantum.BAR)
        assert session.read(boundary).phase == pytest.approx(0.0, abs=1e-6)
    assert not link.enabled
    session.close()


def test_bad_quantum_is_refused():
    with pytest.raises(ValueError, match=r"Link quantum 0 is not allowed: a finite number of beats > 0"):
        LinkSession(quantum=0, binding=FakeBinding)


def test_missing_binding_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "link", None)
    with pytest.raises(TempoSourceUnavailable) as info:
        import_link()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Ableton Link is not available here: the LinkPython-extern package")
    assert message.endswith("`pip install latentstage[link]`.")


def test_a_foreign_link_module_is_not_taken_for_the_binding(monkeypatch):
    foreign = type(sys)("link")
    monkeypatch.setitem(sys.modules, "link", foreign)
    with pytest.raises(TempoSourceUnavailable, match=r"is not LinkPython-extern"):
        import_link()


@pytest.mark.skipif(
    importlib.util.find_spec("link") is None,
    reason="needs the Ableton Link binding (pip install latentstage[link]: LinkPython-extern)",
)
def test_the_real_binding_reads_a_session():
    with LinkSession(quantum=4.0) as session:
        reading = session.read()
        assert 20.0 <= reading.bpm <= 999.0
        assert 0.0 <= reading.phase < 4.0
        assert reading.peers >= 0
