"""Live statistics of the running engine: fps, latency, skip rate, drops; thread-safe."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

CHANGE_SAMPLES = 16  # changes whose change-to-screen latency the median is taken over


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``ordered`` (sorted, not empty), interpolated
    linearly between the two nearest ranks (numpy's default): one slow frame among twenty
    moves the 95th percentile toward it instead of leaving it at the second slowest."""
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class EngineState(str, Enum):
    """Where the engine is in its life."""

    LOADING = "loading"
    WARMING = "warming"
    RUNNING = "running"
    PAUSED = "paused"
    STALLED = "stalled"  # the source is connected but sent no new frame for input.stall_seconds
    LOST = "lost"  # the source is gone (unplugged, closed); reconnecting
    ERROR = "error"
    RESTARTING = "restarting"  # said by the supervisor while it restarts the engine
    STOPPED = "stopped"


class RateMeter:
    """Events per second over a sliding window of recent event times."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def mark(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], self._times[-1] - self._times[0])
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


@dataclass
class SinkCounters:
    """Per-output counters; ``change_ms``: change-to-screen latencies of the latest changes."""

    sent: int = 0
    failures: int = 0
    dropped: int = 0
    connected: bool = False
    change_ms: deque[float] = field(default_factory=lambda: deque(maxlen=CHANGE_SAMPLES))

    @property
    def change_latency_ms(self) -> float:
        """The median of ``change_ms`` (0: no change seen yet)."""
        return round(statistics.median(self.change_ms), 1) if self.change_ms else 0.0


class RuntimeStats:
    """Collects what the status line, the preview page and OSC feedback show."""

    def __init__(self, window_s: float = 2.0, latency_samples: int = 240) -> None:
        self._lock = threading.Lock()
        self._outputs = RateMeter(window_s)
        self._inputs = RateMeter(window_s)
        self._latency_ms: deque[float] = deque(maxlen=latency_samples)
        self._skips: deque[bool] = deque(maxlen=latency_samples)
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.last_error: str | None = None
        self.frames_out = 0
        self.frames_in = 0
        self.input_dropped = 0  # gaps in the source's sequence numbers (lost before us)
        self.input_superseded = 0  # received, then replaced by a newer frame before processing
        self.source_connected = False
        self.building: str | None = None  # engines prepared in the background, e.g. "batch 2 at 768x512"
        self.restarts = 0  # times the supervisor restarted the engine before this process
        self.replicas = 1  # replicas making frames now (scale.replicas; 1: the engine itself)
        self.replicas_configured = 1
        self.replica_states: list[str] = []  # each replica's state (starting, active, out ...) when > 1
        self.sinks: dict[str, SinkCounters] = {}
        self.started = time.monotonic()

    def set_state(self, state: EngineState, error: str | None = None) -> None:
        with self._lock:
            self.state = state
            if error is not None or state is not EngineState.ERROR:
                self.error = error

    def output_fps(self) -> float:
        """Output frames per second over the last window (0 before two frames)."""
        with self._lock:
            return self._outputs.rate(time.monotonic())

    def input_frame(self, now: float) -> None:
        with self._lock:
            self.frames_in += 1
            self._inputs.mark(now)

    def output_frame(self, now: float) -> None:
        with self._lock:
            self.frames_out += 1
            self._outputs.mark(now)

    def record_skip(self, skipped: bool) -> None:
        """One processed input frame: whether the similarity filter skipped it."""
        with self._lock:
            self._skips.append(skipped)

    def latency(self, milliseconds: float) -> None:
        with self._lock:
            self._latency_ms.append(milliseconds)

    def latencies_ms(self) -> list[float]:
        """The latest source-to-sink latencies (ms), oldest first (up to ``latency_samples``)."""
        with self._lock:
            return list(self._latency_ms)

    def change_shown(self, name: str, milliseconds: float) -> None:
        """Output ``name`` sent the first frame carrying a change ``milliseconds`` after its commit."""
        with self._lock:
            self.sinks.setdefault(name, SinkCounters()).change_ms.append(milliseconds)

    def sink(self, name: str) -> SinkCounters:
        with self._lock:
            return self.sinks.setdefault(name, SinkCounters())

    def snapshot(self) -> dict[str, Any]:
        """Plain values for display and feedback."""
        now = time.monotonic()
        with self._lock:
            latencies = sorted(self._latency_ms)
            mean = sum(latencies) / len(latencies) if latencies else 0.0
            p95 = percentile(latencies, 95.0) if latencies else 0.0
            skips = list(self._skips)
            return {
                "state": self.state.value,
                "error": self.error,
                "last_error": self.last_error,
                "fps": round(self._outputs.rate(now), 2),
                "input_fps": round(self._inputs.rate(now), 2),
                "latency_ms": round(mean, 1),
                "latency_p95_ms": round(p95, 1),
                "skip_rate": round(sum(skips) / len(skips), 3) if skips else 0.0,
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "input_dropped": self.input_dropped,
                "input_superseded": self.input_superseded,
                "source_connected": self.source_connected,
                "building": self.building,
                # what a change takes to be seen: the slowest output's median (a beat-quantised
                # change is committed this much before the beat)
                "change_latency_ms": max((c.change_latency_ms for c in self.sinks.values()), default=0.0),
                "restarts": self.restarts,
                "replicas": self.replicas,
                "replicas_configured": self.replicas_configured,
                "replica_states": list(self.replica_states),
                "uptime_s": round(now - self.started, 1),
                "outputs": {
                    name: {
                        "sent": c.sent,
                        "dropped": c.dropped,
                        "failures": c.failures,
                        "change_latency_ms": c.change_latency_ms,
                    }
                    for name, c in self.sinks.items()
                },
            }

    def status_line(self) -> str:
        """One line for the terminal: state, fps, latency, skip rate, drops."""
        s = self.snapshot()
        line = (
            f"[{s['state']:>7}] {s['fps']:6.1f} fps  latency {s['latency_ms']:6.1f} ms "
            f"(p95 {s['latency_p95_ms']:.0f})  skip {100 * s['skip_rate']:4.1f}%  "
            f"in {s['input_fps']:5.1f} fps  dropped in {s['input_dropped']}  "
            f"superseded {s['input_superseded']}"
        )
        if s["state"] == EngineState.STALLED.value:
            line += "  INPUT STALLED"
        elif not s["source_connected"] and s["state"] != EngineState.LOADING.value:
            line += "  SOURCE LOST"
        if s["restarts"]:
            line += f"  restarts {s['restarts']}"
        if s["replicas_configured"] > 1:
            line += f"  replicas {s['replicas']}/{s['replicas_configured']}"
        if s["building"]:
            line += f"  building {s['building']}"
        if s["error"]:
            line += f"  error: {s['error'][:60]}"
        return line
