"""Measure live input switching with the demo: the pattern to a shm writer and back, the output's gaps.

    python scripts/measure_switch.py [--switches 6] [--hold 3]

The demo preset's engine (builtin:shapes on the test pattern, this machine's device) runs with a
recording sink; a shared-memory writer beside it sends a flat colour at 30 fps. Every ``--hold``
seconds ``/input/select`` goes to the other source through the OSC dispatcher. Printed: the output
frame interval (median), the longest gap within 1 s of a switch and elsewhere, and how long each
switch took from the message to its echo. Figures go to BENCHMARKS.md ("Sources and feedback").
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import statistics
import threading
import time

import numpy as np

from bridges.base import Frame
from bridges.shm import ShmPixelFormat, ShmWriter
from engine.config import load_config
from engine.control.dispatch import OscDispatcher
from engine.models.loader import ModelRequest, load_models
from engine.pipeline import PipelineSettings
from engine.runtime.changes import open_pipeline
from engine.runtime.engine import Engine, EngineOptions, runtime_values
from engine.runtime.inputs import SourceNames


class Sink:
    def __init__(self) -> None:
        self.times: list[float] = []

    def send(self, frame: Frame) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--hold", type=float, default=3.0)
    args = parser.parse_args()
    config = load_config(None, presets=["demo"])
    models = load_models(ModelRequest.from_config(config.model))
    pipeline = open_pipeline(models, PipelineSettings.from_config(config))
    names = SourceNames("media", config.input)
    name = f"ls_measure_{secrets.token_hex(3)}"
    writer = ShmWriter(name, config.input.width, config.input.height, ShmPixelFormat.RGBA8)
    pixels = np.full((config.input.height, config.input.width, 4), (10, 200, 30, 255), np.uint8)
    stop = threading.Event()

    def write() -> None:
        while not stop.wait(1 / 30):
            writer.write(pixels)

    threading.Thread(target=write, daemon=True).start()
    sink = Sink()
    echoes: list[tuple[float, str]] = []
    engine = Engine(
        pipeline,
        names.opener("pattern"),
        [("measure", lambda: sink)],
        EngineOptions(runtime_values={**runtime_values(config), "input_source": "pattern"}),
        source_names=names,
    )
    engine.on_applied = lambda accepted: echoes.extend(
        (time.monotonic(), v) for k, v in accepted.items() if k == "input_source"
    )
    dispatcher = OscDispatcher(engine.control, engine.control.applied)
    runner = threading.Thread(target=engine.run, daemon=True)
    sent: list[tuple[float, str]] = []
    try:
        with engine:
            runner.start()
            time.sleep(args.hold)
            for target in itertools.islice(itertools.cycle([f"shm:{name}", "pattern"]), args.switches):
                sent.append((time.monotonic(), target))
                _replies, error = dispatcher.handle_request("/input/select", [target], ("127.0.0.1", 1))
                assert error is None, error
                time.sleep(args.hold)
            engine.stop()
            runner.join(10)
    finally:
        stop.set()
        writer.close()
    times = sink.times
    pairs = list(itertools.pairwise(times))
    switches = [t for t, _ in echoes]
    near = [b - a for a, b in pairs if any(abs(b - s) < 1.0 for s in switches)]
    elsewhere = [b - a for a, b in pairs if all(abs(b - s) >= 1.0 for s in switches)]
    took: list[str] = []
    for (at, target), (done, _name) in zip(sent, echoes, strict=False):
        took.append(f"{target.split(':')[0]} {1000 * (done - at):.0f} ms")
    print(f"{len(times)} output frames, {len(echoes)}/{len(sent)} switches done ({', '.join(took)})")
    print(
        f"output interval median {1000 * statistics.median(b - a for a, b in pairs):.1f} ms; "
        f"longest gap near a switch {1000 * max(near):.1f} ms, elsewhere {1000 * max(elsewhere):.1f} ms"
    )


if __name__ == "__main__":
    main()
