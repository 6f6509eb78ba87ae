"""MidiClockFollower: BPM, running state and beat position from timestamped MIDI realtime messages."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

log = logging.getLogger(__name__)

PULSES_PER_BEAT = 24  # MIDI clock: 24 pulses per quarter note
PULSES_PER_SIXTEENTH = 6  # song position pointer counts sixteenth notes
MIN_WINDOW, MAX_WINDOW = 24, 96
CHANGE_SIGMAS = 4.0  # the long and recent fits differ by more than this many standard errors: a change
MIN_CHANGE = 1e-4  # ...and by more than this fraction of the period (jitter-free input)


class MidiRealtime(IntEnum):
    """The MIDI status bytes the follower reads."""

    SONG_POSITION = 0xF2
    CLOCK = 0xF8
    START = 0xFA
    CONTINUE = 0xFB
    STOP = 0xFC


@dataclass(frozen=True)
class MidiClockState:
    """The follower at one time: ``bpm`` (``None`` until enough pulses), ``running``, and the beat
    position (beats) ``beat`` at ``time`` (seconds).

    To drive a ``TempoClock``: ``clock.set_beat(s.beat, s.time, s.bpm)`` when ``s.bpm`` is known.
    """

    time: float
    bpm: float | None
    beat: float
    running: bool


class MidiClockFollower:
    """Follows a MIDI clock: 24 pulses per beat, start / continue / stop, song position pointer.

    **Tempo.** The BPM comes from least-squares lines of pulse arrival time against pulse number.
    Why a fit and not an average of intervals: the fit uses absolute arrival times, so a late
    pulse (which makes one interval long and the next short) moves it very little, and its error
    falls as ``window ** -1.5``, where an average of ``N`` noisy intervals only gains
    ``N ** -0.5`` (a plain mean of intervals is (last - first) / N: it throws away every pulse in
    between; an EMA of intervals also lags without a bound). Two windows: the last
    ``window_pulses`` pulses (default 96, four beats) for precision, and the recent
    ``fast_pulses`` (default 48, two beats) for speed. When their slopes differ by more than
    ``CHANGE_SIGMAS`` standard errors of the recent fit (the jitter is measured from its
    residuals), the tempo changed: for the next ``fast_pulses`` pulses only the recent ones
    count, so the estimate is the new tempo once ``fast_pulses`` pulses at it have arrived.
    Measured on synthetic trains with 1 ms Gaussian jitter (tests/test_tempo_midi_clock.py,
    300 seeds): at 128.5 BPM the error is 0.07 BPM RMS (95 % within 0.14) after 2 beats and
    0.023 RMS (95 % within 0.05) after 4; 2 beats after a change 120 -> 140 BPM, 0.09 RMS (95 %
    within 0.17). A change smaller than the noise threshold (about 0.3 BPM at 1 ms jitter) is
    followed within 4 beats instead of 2. A gap longer than ``max_gap_s`` (the sender paused or
    dropped pulses) restarts the fit; the position is kept. Cost: two fits of at most 96 points
    per pulse, on the MIDI thread.

    **Position.** Start: the first clock after it is beat 0. Continue: the next clock is one pulse
    after the last one (or at the song position pointer's position, if one came). Stop: the
    position holds at the last pulse; clocks that keep coming while stopped still update the tempo.
    Between pulses the beat is extrapolated at the estimated tempo, never beyond the next pulse.
    Before the first start or continue the position is 0 and not running.

    Thread-safety: ``feed`` (the MIDI thread) works under one lock and publishes an immutable
    snapshot; ``bpm``, ``running``, ``beat`` and ``state`` (the frame loop) read it without waiting.
    Times are seconds on the ``now`` clock (``time.monotonic`` unless injected).
    """

    def __init__(
        self,
        window_pulses: int = 96,
        fast_pulses: int = 48,
        min_pulses: int = 12,
        max_gap_s: float = 0.5,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_int("window_pulses", window_pulses, MIN_WINDOW, MAX_WINDOW)
        _check_int("fast_pulses", fast_pulses, MIN_WINDOW, window_pulses)
        _check_int("min_pulses", min_pulses, 3, fast_pulses)
        if not 0.0 < max_gap_s <= 10.0:
            raise ValueError(f"max_gap_s {max_gap_s!r} is not allowed: seconds in (0, 10]")
        self.fast_pulses = fast_pulses
        self.min_pulses = min_pulses
        self.max_gap_s = max_gap_s
        self._now = now
        self._lock = threading.Lock()
        self._pulses: deque[float] = deque(maxlen=window_pulses)  # arrival times, one per pulse
        self._last_time: float | None = None
        self._running = False
        self._next_index = 0  # song position, in pulses, of the next clock to count
        self._index: int | None = None  # song position of the last counted clock
        self._index_time = 0.0
        self._period: float | None = None  # seconds per pulse
        self._fast_left = 0  # pulses to go in which only the recent ones count (after a change)
        self._snapshot = _Snapshot(None, 0, 0.0, None, False)

    # -- input (the MIDI thread) ------------------------------------------------------------------

    def feed(self, status: int, t: float | None = None, data: Sequence[int] = ()) -> bool:
        """One MIDI message: its ``status`` byte, arrival time ``t`` (seconds) and data bytes
        (two for the song position pointer). True when it was a message the follower reads;
        other valid MIDI status bytes are ignored (False)."""
        if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 0xFF:
            raise ValueError(f"MIDI status {status!r} is not allowed: a byte 0..255")
        try:
            kind = MidiRealtime(status)
        except ValueError:
            return False
        if kind is MidiRealtime.SONG_POSITION:
            if len(data) != 2 or not all(0 <= b <= 0x7F for b in data):
                raise ValueError(f"song position data {tuple(data)!r} is not allowed: two bytes 0..127")
            self.song_position(data[0] | (data[1] << 7))
            return True
        handler = {
            MidiRealtime.CLOCK: self.clock,
            MidiRealtime.START: self.start,
            MidiRealtime.CONTINUE: self.continue_,
            MidiRealtime.STOP: self.stop,
        }[kind]
        handler(t)
        return True

    def _at(self, t: float | None) -> float:
        at = self._now() if t is None else float(t)
        if self._last_time is not None and at < self._last_time:
            raise ValueError(
                f"MIDI message time {at!r} is before the previous one {self._last_time!r}: "
                "times must not go back"
            )
        self._last_time = at
        return at

    def clock(self, t: float | None = None) -> None:
        """A timing clock pulse (0xF8) at ``t`` seconds."""
        with self._lock:
            at = self._at(t)
            if self._pulses and at - self._pulses[-1] > self.max_gap_s:
                log.debug("MIDI clock gap of %.3f s: the tempo fit restarts", at - self._pulses[-1])
                self._pulses.clear()
                self._fast_left = 0
            self._pulses.append(at)
            if len(self._pulses) >= self.min_pulses:
                slope = self._fit()
                # pulses stamped all at once (a buffered burst) say nothing about the tempo
                self._period = slope if slope > 0.0 else self._period
            if self._running:
                self._index = self._next_index
                self._index_time = at
                self._next_index += 1
            self._publish()

    def _fit(self) -> float:
        """Seconds per pulse from the pulses in the window.

        The long window's slope, unless the recent ``fast_pulses`` pulses' slope differs from it
        by more than the jitter explains: a tempo change. Then, for the next ``fast_pulses``
        pulses, only the recent ones count, so that the pulses from before the change have all
        left the fit within ``fast_pulses`` pulses after it; then the window grows again.
        """
        n = self.fast_pulses
        if len(self._pulses) <= n:
            return _line(self._pulses)[0]
        recent, spread = _line(list(self._pulses)[-n:])
        if self._fast_left > 0:
            self._fast_left -= 1
        else:
            slope = _line(self._pulses)[0]
            limit = max(CHANGE_SIGMAS * spread * math.sqrt(12.0 / (n * (n * n - 1))), MIN_CHANGE * recent)
            if abs(slope - recent) <= limit:
                return slope
            log.debug("MIDI clock tempo change: %.2f -> %.2f bpm", _to_bpm(slope), _to_bpm(recent))
            self._fast_left = n
        while len(self._pulses) > n:
            self._pulses.popleft()
        return recent

    def start(self, t: float | None = None) -> None:
        """Start (0xFA): the next clock is beat 0."""
        with self._lock:
            self._at(t)
            self._running = True
            self._next_index = 0
            self._index = None
            self._publish()

    def continue_(self, t: float | None = None) -> None:
        """Continue (0xFB): run on from the held position (or the song position pointer's)."""
        with self._lock:
            self._at(t)
            self._running = True
            self._publish()

    def stop(self, t: float | None = None) -> None:
        """Stop (0xFC): the position holds at the last pulse."""
        with self._lock:
            self._at(t)
            self._running = False
            self._publish()

    def song_position(self, sixteenths: int) -> None:
        """Song position pointer (0xF2), in sixteenth notes: where the next clock after a
        continue will be."""
        if isinstance(sixteenths, bool) or not isinstance(sixteenths, int) or not 0 <= sixteenths < 1 << 14:
            raise ValueError(f"song position {sixteenths!r} is not allowed: sixteenths 0..16383")
        with self._lock:
            if self._running:
                log.debug("song position pointer while running: applied at the next clock")
            self._next_index = sixteenths * PULSES_PER_SIXTEENTH
            self._index = None
            self._publish()

    def reset(self) -> None:
        """Forget tempo and position (stopped, beat 0)."""
        with self._lock:
            self._pulses.clear()
            self._last_time = None
            self._running, self._next_index, self._index, self._period = False, 0, None, None
            self._fast_left = 0
            self._publish()

    def _publish(self) -> None:
        held = self._next_index if self._index is None else self._index
        self._snapshot = _Snapshot(self._period, held, self._index_time, self._index, self._running)

    # -- reads (the frame loop; no lock) ----------------------------------------------------------

    @property
    def bpm(self) -> float | None:
        """The estimated tempo in beats per minute, or ``None`` before ``min_pulses`` pulses."""
        return self._snapshot.bpm

    @property
    def running(self) -> bool:
        return self._snapshot.running

    def beat(self, t: float | None = None) -> float:
        """Beat position (beats since the start) at ``t`` seconds."""
        return self._snapshot.beat_at(self._now() if t is None else t)

    def state(self, t: float | None = None) -> MidiClockState:
        at = self._now() if t is None else t
        snap = self._snapshot
        return MidiClockState(time=at, bpm=snap.bpm, beat=snap.beat_at(at), running=snap.running)


@dataclass(frozen=True)
class _Snapshot:
    period: float | None  # seconds per pulse
    held_index: int  # the position (pulses) when not extrapolating
    index_time: float  # arrival time of the last counted pulse
    index: int | None  # the last counted pulse, None before the first clock after start / SPP
    running: bool

    @property
    def bpm(self) -> float | None:
        return None if self.period is None else _to_bpm(self.period)

    def beat_at(self, t: float) -> float:
        pulses = float(self.held_index)
        if self.running and self.index is not None and self.period is not None:
            pulses += min(max((t - self.index_time) / self.period, 0.0), 1.0)
        return pulses / PULSES_PER_BEAT


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} is not allowed: an integer {low}..{high}")


def _to_bpm(period: float) -> float:
    return 60.0 / (period * PULSES_PER_BEAT) if period > 0.0 else math.inf


def _line(times: Iterable[float]) -> tuple[float, float]:
    """Least-squares line of arrival time (seconds) against pulse number 0..n-1 (n >= 3): the slope
    (seconds per pulse) and the residuals' standard deviation (seconds)."""
    ts = list(times)
    n = len(ts)
    mean_x = (n - 1) / 2.0
    ys = [t - ts[0] for t in ts]
    mean_y = sum(ys) / n
    sxx = n * (n * n - 1) / 12.0
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys)) / sxx
    ssr = sum((y - mean_y - slope * (i - mean_x)) ** 2 for i, y in enumerate(ys))
    return slope, math.sqrt(ssr / (n - 2))
