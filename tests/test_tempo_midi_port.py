"""The mido adapter with an in-memory stand-in for mido: messages reach the follower; clear errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from engine.tempo.extras import TempoSourceUnavailable
from engine.tempo.midi_clock import MidiClockFollower
from engine.tempo.midi_port import MidiClockPort, feed_message, import_mido


class Message:
    def __init__(self, *raw: int) -> None:
        self.raw = list(raw)

    def bytes(self) -> list[int]:
        return list(self.raw)


class FakePort:
    def __init__(self, name: str, callback: Callable[[Message], None]) -> None:
        self.name, self.callback, self.closed = name, callback, 0

    def close(self) -> None:
        self.closed += 1


class FakeMido:
    """``open_input`` / ``get_input_names`` as mido has them, over in-memory ports."""

    def __init__(self, names: list[str], error: type[BaseException] | None = None) -> None:
        self.names, self.error, self.ports = names, error, []

    def open_input(self, name: str | None = None, callback=None) -> FakePort:
        if self.error is not None:
            raise self.error("no such thing")
        if name is not None and name not in self.names:
            raise OSError(f"unknown port {name!r}")
        port = FakePort(name or self.names[0], callback)
        self.ports.append(port)
        return port

    def get_input_names(self) -> list[str]:
        return list(self.names)


def test_messages_on_the_port_drive_the_follower():
    now = [10.0]
    follower = MidiClockFollower()
    mido = FakeMido(["Clock Out"])
    with MidiClockPort(follower, "Clock Out", now=lambda: now[0], mido=mido) as port:
        send = mido.ports[0].callback
        send(Message(0xFA))  # start
        for _ in range(48):
            now[0] += 60 / (125 * 24)
            send(Message(0xF8))
        send(Message(0x90, 60, 100))  # a note: ignored
        assert follower.running
        assert follower.bpm == pytest.approx(125.0)
        assert follower.beat(now[0]) == pytest.approx(47 / 24)
    assert mido.ports[0].closed == 1
    port.close()
    assert mido.ports[0].closed == 1


def test_a_bad_message_is_logged_not_raised(caplog):
    mido = FakeMido(["A"])
    follower = MidiClockFollower()
    times = iter([5.0, 4.0])
    MidiClockPort(follower, mido=mido, now=lambda: next(times))
    mido.ports[0].callback(Message(0xF8))
    mido.ports[0].callback(Message(0xF8))  # time went back: refused by the follower
    assert "MIDI clock message ignored: MIDI message time 4.0 is before" in caplog.text


def test_feed_message_passes_status_and_data():
    follower = MidiClockFollower()
    assert feed_message(follower, Message(0xF2, 0x10, 0x00), 1.0)
    assert follower.beat(1.0) == pytest.approx(4.0)  # 16 sixteenths
    assert not feed_message(follower, Message(), 1.0)


def test_unknown_port_names_the_inputs_there():
    with pytest.raises(ValueError, match=r"MIDI input 'Nope' cannot be opened .*inputs here: 'A', 'B'"):
        MidiClockPort(MidiClockFollower(), "Nope", mido=FakeMido(["A", "B"]))


def test_missing_backend_names_the_extra():
    with pytest.raises(TempoSourceUnavailable, match=r"pip install latentstage\[midi\]"):
        MidiClockPort(MidiClockFollower(), mido=FakeMido(["A"], error=ImportError))


def test_missing_mido_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mido", None)  # import mido raises ImportError
    with pytest.raises(TempoSourceUnavailable) as info:
        import_mido()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MIDI clock input is not available here: the mido package is not installed")
    assert message.endswith("Install it with `pip install latentstage[midi]`.")
    with pytest.raises(TempoSourceUnavailable):
        MidiClockPort(MidiClockFollower())
