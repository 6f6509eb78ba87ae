"""Measure the MIDI path on this machine: a CC to ControlState (latency), and a 10,000-CC flood.

    python scripts/measure_midi.py

The controller is the in-memory backend (engine.midi.loopback); the service, the dispatcher and
ControlState are the engine's own. Figures go to BENCHMARKS.md ("MIDI").
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import mido

from engine.control.dispatch import OscDispatcher
from engine.control.state import ControlState
from engine.midi import loopback
from engine.midi.service import MidiService, MidiSettings

PORT = "Loopback 20:0"


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    (folder / "bench.yaml").write_text(
        'input: "Loopback"\nbindings:\n  - {cc: 1, to: guidance_scale, range: [0, 5], takeover: jump}\n'
    )
    state = ControlState({"guidance_scale": 1.0})
    dispatcher = OscDispatcher(state, state.applied)
    loopback.reset()
    loopback.plug(PORT)
    service = MidiService(
        MidiSettings(("bench",), folder, poll_s=1.5, feedback_hz=30.0),
        dispatcher, state.latest, state.applied, lambda address, args: None,
        backend=mido.Backend("engine.midi.loopback"),
    )  # fmt: skip
    with service:
        while not service.controllers[0].connected:
            time.sleep(0.01)
        latencies = []
        for i in range(200):
            version = state.version
            start = time.perf_counter()
            loopback.play(PORT, mido.Message("control_change", control=1, value=i % 128))
            while state.version == version:
                time.sleep(0)
            latencies.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
        written = service.commands_written
        start = time.perf_counter()
        for i in range(10_000):
            loopback.play(PORT, mido.Message("control_change", control=1, value=i % 128))
        sent_s = time.perf_counter() - start
        while service._inbox:
            time.sleep(0.001)
        time.sleep(0.05)
        drained_s = time.perf_counter() - start
        flood_writes = service.commands_written - written
    q = statistics.quantiles(latencies, n=20)
    print(f"CC -> ControlState: median {statistics.median(latencies):.3f} ms, p95 {q[18]:.3f} ms (200 CCs)")
    print(
        f"flood: 10,000 CCs played in {sent_s * 1000:.0f} ms, all taken in {drained_s * 1000:.0f} ms, "
        f"{flood_writes} writes to ControlState (coalesced), newest {state.latest('guidance_scale'):.4f}"
    )


if __name__ == "__main__":
    main()
