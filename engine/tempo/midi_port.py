"""MidiClockPort: MIDI clock from a mido input port into a MidiClockFollower (the optional ``midi`` extra)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from bridges.ratelimit import RateLimitedLog
from engine.tempo.extras import missing_extra
from engine.tempo.midi_clock import MidiClockFollower

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log, interval=1.0)

EXTRA = "midi"


class RawMessage(Protocol):
    """What the adapter needs of a message (``mido.Message`` has it): its bytes, status first."""

    def bytes(self) -> list[int]: ...


def feed_message(follower: MidiClockFollower, message: RawMessage, t: float) -> bool:
    """Pass one message, received at ``t`` seconds, to the follower; whether it read it."""
    raw = message.bytes()
    return bool(raw) and follower.feed(raw[0], t, raw[1:])


def import_mido(what: str = "MIDI clock input") -> ModuleType:
    """The ``mido`` module, or the one-line error naming ``what`` needs it and the extra."""
    try:
        import mido
    except ImportError as exc:
        raise missing_extra(EXTRA, what, f"the mido package is not installed ({exc})") from None
    return mido


class MidiClockPort:
    """Listens on a MIDI input port and feeds its messages to ``follower``, stamped with ``now()``.

    mido calls ``_on_message`` on its own thread; the follower does all the work. Use as a
    context manager or call ``close()`` (safe twice). ``port_name`` ``None``: the default input.
    """

    def __init__(
        self,
        follower: MidiClockFollower,
        port_name: str | None = None,
        now: Callable[[], float] = time.monotonic,
        mido: Any = None,
    ) -> None:
        self.follower = follower
        self._now = now
        lib = import_mido() if mido is None else mido
        try:
            self._port = lib.open_input(port_name, callback=self._on_message)
        except ImportError as exc:  # mido loads its backend (python-rtmidi) on first use
            reason = f"the MIDI backend is not installed ({exc})"
            raise missing_extra(EXTRA, "MIDI clock input", reason) from None
        except OSError as exc:
            names = ", ".join(repr(n) for n in lib.get_input_names()) or "none"
            raise ValueError(
                f"MIDI input {port_name!r} cannot be opened ({exc}): inputs here: {names}"
            ) from None
        self._closed = False
        log.info("MIDI clock from %s", getattr(self._port, "name", port_name))

    def _on_message(self, message: RawMessage) -> None:
        try:
            feed_message(self.follower, message, self._now())
        except ValueError as exc:
            _ratelimited(logging.WARNING, "midi_clock", "MIDI clock message ignored: %s", exc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._port.close()

    def __enter__(self) -> MidiClockPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
