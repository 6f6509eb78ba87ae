"""TapTempo: a BPM and a beat time from tap times (seconds), robust to one mistimed tap."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.tempo.clock import MAX_BPM, MIN_BPM

log = logging.getLogger(__name__)

INLIER_TOLERANCE = 0.15  # an interval further than 15 % from the median is a mistimed tap


@dataclass(frozen=True)
class TapEstimate:
    """What the taps say: ``bpm`` and ``beat_time``, the time (seconds) of the last tap, which is a beat.

    To follow it: ``clock.set_bpm(estimate.bpm, estimate.beat_time, on_beat=True)`` (the tempo and
    the phase at once; the beat count stays). ``taps``: taps in the current series;
    ``intervals_used``: intervals that agreed with the median and were averaged.
    """

    bpm: float
    beat_time: float
    taps: int
    intervals_used: int


class TapTempo:
    """BPM from the intervals between consecutive taps.

    A gap longer than ``max_gap_s`` seconds starts a new series. Two taps (one interval) give a
    first estimate; up to the last ``max_intervals`` intervals are used: the median interval,
    then the mean of the intervals within 15 % of it. The median makes one mistimed tap (which
    makes one interval short and the next long) harmless; the mean of the agreeing intervals is
    then as precise as the span of the taps allows. A tap closer than one beat at 999 BPM to the
    previous one is a bounce and is ignored. Thread-safe (one lock).
    """

    def __init__(
        self, max_gap_s: float = 2.0, max_intervals: int = 8, now: Callable[[], float] = time.monotonic
    ) -> None:
        if not 60.0 / MAX_BPM < max_gap_s <= 60.0 / MIN_BPM:
            raise ValueError(
                f"max_gap_s {max_gap_s!r} is not allowed: seconds in "
                f"({60.0 / MAX_BPM:.3f}, {60.0 / MIN_BPM:g}]"
            )
        if isinstance(max_intervals, bool) or not isinstance(max_intervals, int) or max_intervals < 1:
            raise ValueError(f"max_intervals {max_intervals!r} is not allowed: an integer >= 1")
        self.max_gap_s = max_gap_s
        self._now = now
        self._lock = threading.Lock()
        self._last: float | None = None
        self._taps = 0
        self._intervals: deque[float] = deque(maxlen=max_intervals)
        self._estimate: TapEstimate | None = None

    def tap(self, t: float | None = None) -> TapEstimate | None:
        """Register a tap at ``t`` (seconds; ``now()`` when ``None``); the estimate, or ``None``
        while the series has only one tap."""
        with self._lock:
            at = self._now() if t is None else float(t)
            if self._last is not None and at < self._last:
                raise ValueError(
                    f"tap time {at!r} is before the previous tap {self._last!r}: taps must come in order"
                )
            gap = None if self._last is None else at - self._last
            if gap is not None and gap < 60.0 / MAX_BPM:
                log.debug("tap %.3f s after the previous one ignored (a bounce)", gap)
                return self._estimate
            if gap is None or gap > self.max_gap_s:
                self._intervals.clear()
                self._taps = 0
                self._estimate = None
            else:
                self._intervals.append(gap)
            self._last = at
            self._taps += 1
            if self._intervals:
                self._estimate = self._estimate_from(at)
            return self._estimate

    def _estimate_from(self, last: float) -> TapEstimate:
        median = statistics.median(self._intervals)
        agreeing = [i for i in self._intervals if abs(i - median) <= INLIER_TOLERANCE * median]
        if not agreeing:  # two intervals that disagree (their median is their mean): the newest counts
            agreeing = [self._intervals[-1]]
        interval = sum(agreeing) / len(agreeing)
        bpm = min(max(60.0 / interval, MIN_BPM), MAX_BPM)
        return TapEstimate(bpm=bpm, beat_time=last, taps=self._taps, intervals_used=len(agreeing))

    @property
    def estimate(self) -> TapEstimate | None:
        """The last estimate (``None`` before two taps of one series)."""
        return self._estimate

    def reset(self) -> None:
        """Forget every tap."""
        with self._lock:
            self._last, self._taps, self._estimate = None, 0, None
            self._intervals.clear()
