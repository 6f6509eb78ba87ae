"""LinkSession: tempo and beat from an Ableton Link session, read only (the optional ``link`` extra).

The binding is LinkPython-extern (PyPI, module ``link``): its wrapper is Unlicense, but its wheels
contain Ableton Link, which is GPL-2.0-or-later (or Ableton's proprietary licence). It is an
optional extra, imported only here and only when a Link source is asked for; the core stays
Apache-2.0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from engine.tempo.clock import TempoClock
from engine.tempo.extras import missing_extra

log = logging.getLogger(__name__)

EXTRA = "link"
# Only used when no other peer is there (a session of one); a joining peer adopts the older
# session's timeline (Link's Sessions.hpp), so this value never reaches anyone else.
SOLO_BPM = 120.0


@dataclass(frozen=True)
class LinkReading:
    """The session at ``time`` (seconds on our ``now`` clock): ``bpm``; ``beat`` (beats, our
    magnitude, the session's phase); ``phase`` in ``[0, quantum)`` beats; ``peers`` (others in the
    session); ``playing`` (the shared transport, meaningful with start/stop sync)."""

    time: float
    bpm: float
    beat: float
    phase: float
    quantum: float
    peers: int
    playing: bool


def validate_quantum(quantum: float) -> float:
    """A Link quantum in beats, or a ValueError naming it and what is allowed."""
    value = float(quantum)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"Link quantum {quantum!r} is not allowed: a finite number of beats > 0")
    return value


def link_micros(t: float, now_s: float, link_now_us: int) -> int:
    """Our time ``t`` (seconds) on Link's clock (microseconds), from one pair of simultaneous
    readings: ``now_s`` on our clock and ``link_now_us`` on Link's."""
    return link_now_us + round((t - now_s) * 1e6)


def read_session(link: Any, t: float, now_s: float, quantum: float) -> LinkReading:
    """Read tempo, beat and phase at our time ``t`` from a binding's ``Link`` object; writes
    nothing to the session (no ``commit``, no ``setTempo``)."""
    at = link_micros(t, now_s, int(link.clock().micros()))
    capture = getattr(link, "captureAppSessionState", None) or link.captureSessionState
    state = capture()
    return LinkReading(
        time=t,
        bpm=float(state.tempo()),
        beat=float(state.beatAtTime(at, quantum)),
        phase=float(state.phaseAtTime(at, quantum)),
        quantum=quantum,
        peers=int(link.numPeers()),
        playing=bool(state.isPlaying()),
    )


def import_link() -> ModuleType:
    """The binding's ``link`` module, or the one-line error naming the extra."""
    try:
        import link as binding
    except ImportError as exc:
        reason = f"the LinkPython-extern package is not installed ({exc})"
        raise missing_extra(EXTRA, "Ableton Link", reason) from None
    if not hasattr(binding, "Link"):
        reason = f"the module 'link' at {getattr(binding, '__file__', '?')} is not LinkPython-extern"
        raise missing_extra(EXTRA, "Ableton Link", reason)
    return binding


class LinkSession:
    """A read-only peer in the Link session on the local network.

    Joining never changes the session's tempo: the adapter enables Link and only captures its
    state; it never commits one. ``quantum`` (beats, default 4: one bar of 4/4) is the unit of
    phase shared with peers: with the clock's beats per bar as quantum, bar boundaries line up
    with theirs. Times are seconds on ``now`` (``time.monotonic`` unless injected), mapped onto
    Link's clock at each read. Capturing is safe from any application thread.
    """

    def __init__(
        self, quantum: float = 4.0, now: Callable[[], float] = time.monotonic, binding: Any = None
    ) -> None:
        self.quantum = validate_quantum(quantum)
        self._now = now
        lib = import_link() if binding is None else binding
        self._link = lib.Link(SOLO_BPM)
        self._link.enabled = True
        self._closed = False
        log.info("Ableton Link enabled (quantum %g beats)", self.quantum)

    def read(self, t: float | None = None) -> LinkReading:
        """The session at ``t`` seconds (``now()`` when ``None``)."""
        now_s = self._now()
        return read_session(self._link, now_s if t is None else t, now_s, self.quantum)

    def apply_to(self, clock: TempoClock, t: float | None = None) -> LinkReading:
        """Set ``clock``'s tempo and beat at ``t`` from the session (our side only)."""
        reading = self.read(t)
        clock.set_beat(reading.beat, reading.time, bpm=reading.bpm)
        return reading

    def close(self) -> None:
        """Leave the session (safe twice)."""
        if not self._closed:
            self._closed = True
            self._link.enabled = False

    def __enter__(self) -> LinkSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
