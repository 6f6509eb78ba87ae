"""Measure how fast a dead or stuck replica leaves the rotation, and how long it takes to rejoin.

    python scripts/measure_replica_faults.py [--size 64] [--hang 0.5]

An engine with two replicas of ``builtin:tiny`` (one slot, no guidance) on a 120 fps input and a
counting sink; once both play, replica 0 gets SIGKILL, and once it is back, replica 1 gets SIGSTOP
(alive, but it makes nothing). Printed per fault: the time from the signal to the replica's removal
from the rotation, the output rate on the one replica left, and the time until it rejoined. Linux and
macOS (signals). Figures go to BENCHMARKS.md ("Replicas").
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable

import numpy as np

from bridges.base import Frame
from engine.config import load_config
from engine.models.loader import load_models
from engine.pipeline import PipelineSettings
from engine.runtime.changes import open_pipeline
from engine.runtime.engine import Engine, EngineOptions
from engine.runtime.replicas.coordinator import ReplicaSet, ReplicaSettings
from engine.runtime.replicas.worker import weights_fingerprint


class _Input:
    """A flat grey picture every 1/120 s."""

    def __init__(self, size: int) -> None:
        self._pixels = np.full((size, size, 4), 128, dtype=np.uint8)
        self._next = time.monotonic()
        self._sequence = 0

    def recv(self, timeout: float) -> Frame | None:
        wait = self._next - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            return None
        time.sleep(max(0.0, wait))
        self._next = max(self._next + 1 / 120, time.monotonic())
        self._sequence += 1
        return Frame(self._pixels, time.monotonic(), self._sequence)

    def close(self) -> None:
        pass


class _Count:
    def __init__(self) -> None:
        self.frames = 0

    def send(self, frame: Frame) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


def _until(engine: Engine, done: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"not in {limit_s} s: {list(engine.replicas.events) if engine.replicas else ''}")
        engine.run(max_frames=engine.frames_emitted + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--hang", type=float, default=0.5, help="scale.hang_seconds")
    args = parser.parse_args()
    config = load_config(
        overrides=[
            "model.id=builtin:tiny",
            f"stream.width={args.size}",
            f"stream.height={args.size}",
            "stream.t_index_list=[35]",
            "stream.cfg_type=none",
            "scale.replicas=2",
            "scale.threads=1",
            f"scale.hang_seconds={args.hang}",
            "logging.level=WARNING",
        ]
    )
    models = load_models(config.model)
    replicas = ReplicaSet(
        ReplicaSettings.from_config(config, "cpu"),
        config.model_dump(mode="json"),
        weights_fingerprint(models),
    )
    sink = _Count()
    pipeline = open_pipeline(models, PipelineSettings.from_config(config))
    source = _Input(args.size)
    engine = Engine(
        pipeline,
        lambda: source,
        [("count", lambda: sink)],
        EngineOptions(stall_seconds=0.0),
        replicas=replicas,
    )
    with engine:
        _until(engine, lambda: engine.stats.replicas == 2, 300.0)
        _until(engine, lambda: sink.frames > 20, 60.0)
        frame_ms = 1000 * replicas.typical_frame_s()
        print(f"frame {frame_ms:.1f} ms; a hang after {replicas.hang_limit_s():.2f} s")
        for number, sent in ((0, signal.SIGKILL), (1, signal.SIGSTOP)):
            _until(engine, lambda: engine.stats.replicas == 2, 300.0)
            since = len(replicas.events)

            def said(text: str, since: int = since) -> bool:
                return any(text in line for line in list(replicas.events)[since:])

            started = time.monotonic()
            os.kill(replicas.lanes[number].process.pid, sent)
            _until(engine, lambda n=number: said(f"replica {n}: out"), 60.0)
            out_after = time.monotonic() - started
            frames, counted_at = sink.frames, time.monotonic()
            _until(engine, lambda f=frames: sink.frames >= f + 20, 60.0)
            fps = 20 / (time.monotonic() - counted_at)
            _until(engine, lambda n=number: said(f"replica {n}: joined"), 300.0)
            back_after = time.monotonic() - started
            print(
                f"{sent.name} replica {number}: out after {out_after:.3f} s, {fps:.0f} fps on the other, "
                f"rejoined {back_after:.1f} s after the signal"
            )


if __name__ == "__main__":
    main()
