"""Measure where quantised scene loads are seen: the first output frame carrying the scene vs the bar.

Runs the demo (builtin:shapes, the test pattern) in this process with a null output, loads two
scenes in turn with ``/quantize s bar`` over the real dispatcher, and prints, per load, the time
from the bar to the moment the first output frame carrying it was handed to the output (the
outputs time this themselves: the change-to-screen latency), then the median and the spread.

    python scripts/measure_quantize.py [--loads 8] [--bpm 120]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

from pythonosc.osc_message_builder import OscMessageBuilder

from bridges.base import open_source
from engine.config import load_config
from engine.control.scenes import SceneStore
from engine.control.service import ControlService, ControlSettings
from engine.models.loader import load_models
from engine.pipeline import PipelineSettings
from engine.runtime.changes import open_pipeline
from engine.runtime.engine import Engine, EngineOptions, runtime_values
from engine.runtime.music import MusicSettings


class NullSink:
    def send(self, frame: object) -> None:
        pass

    def close(self) -> None:
        pass


def _msg(address: str, *args: object) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=8)
    parser.add_argument("--bpm", type=float, default=120.0)
    args = parser.parse_args()
    config = load_config(presets=["demo"], overrides=[f"tempo.bpm={args.bpm}"])
    models = load_models(config.model)
    pipeline = open_pipeline(models, PipelineSettings.from_config(config))
    options = EngineOptions(runtime_values=runtime_values(config))
    engine = Engine(
        pipeline,
        lambda: open_source("pattern", fps=30, width=128, height=128),
        [("null", NullSink)],
        options,
        music_settings=MusicSettings.from_config(config),
    )
    folder = tempfile.mkdtemp()
    store = SceneStore(folder)
    store.save("a", {"guidance_scale": 1.5, "prompt": "blue stripes"})
    store.save("b", {"guidance_scale": 2.5, "prompt": "red"})
    service = ControlService(
        ControlSettings(port=0, feedback=[], oscquery_port=None, scenes_dir=folder),
        engine.control,
        engine.submit,
        engine.status,
        music=engine.music,
    )
    thread = threading.Thread(target=engine.run, daemon=True)
    offsets = []
    with engine:
        thread.start()
        time.sleep(4.0)  # warm up; a few plain changes measure the change latency first
        for value in (1.9, 2.1, 2.0):
            engine.submit({"guidance_scale": value})
            time.sleep(0.5)
        send = service.dispatcher.handle_datagram
        send(_msg("/quantize", "bar"), ("127.0.0.1", 1))
        time.sleep(0.5)
        for index in range(args.loads):
            before = engine.last_change.number if engine.last_change else 0
            sent = time.monotonic()
            send(_msg("/preset/load", "ab"[index % 2]), ("127.0.0.1", 1))
            lead = engine.music.lead()
            bar = engine.music.clock.next_boundary(sent + lead, "bar")
            while engine.last_change is None or engine.last_change.number == before:
                time.sleep(0.005)
            change = engine.last_change
            counters = engine.stats.sink("null")
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not counters.change_ms:
                time.sleep(0.005)
            time.sleep(0.4)
            shown = change.committed_at + counters.change_ms[-1] / 1000.0
            offsets.append(1000.0 * (shown - bar))
            print(
                f"load {index + 1}: committed {1000 * (bar - change.committed_at):6.1f} ms before the bar, "
                f"seen {offsets[-1]:+6.1f} ms from it (lead {1000 * lead:.0f} ms)"
            )
            time.sleep(max(0.0, bar + 1.0 - time.monotonic()))
        engine.stop()
        thread.join(5)
    service.close()
    print(
        f"median offset {statistics.median(offsets):+.1f} ms, range {min(offsets):+.1f} .. "
        f"{max(offsets):+.1f} ms over {len(offsets)} loads"
    )


if __name__ == "__main__":
    main()
