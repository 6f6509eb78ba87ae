#!/usr/bin/env python3
"""Soak test (not in CI): N minutes of the demo driven like a show, sampled to CSV and a plot.

It starts `latentstage run --preset demo` as a child process with a shared-memory output it
reads itself, sends a prompt change every second and a scene save + load every 30 s over
OSC, and every second samples the engine's RSS, fps and latency (from its OSC feedback)
and the longest gap between two output frames. An optional OSC flood (``--flood``) measures
the frame rate under 2,500 hostile datagrams a second against the minute before it. At the
end it stops the engine with SIGINT and times the stop.

    pip install -e ".[soak]"
    python scripts/soak.py --minutes 30            # out/soak/soak.csv, soak.png, summary.json
    python scripts/soak.py --minutes 3 --flood --set stream.width=128 --set stream.height=128

The summary prints the figures the fault targets name: RSS growth, fps, latency, the longest
output gap, the stop time (target 2 s) and the flood ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from osc_peer import FeedbackListener, free_port, hostile_datagrams, osc_flags  # beside this script

from bridges.base import BridgeError
from bridges.shm import ShmReader, segment_exists
from engine.control.transport import build_message

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "a neon jellyfish, studio lighting",
    "a glowing forest at night",
    "a chrome city in the rain",
    "an ink drawing of waves",
    "a field of red poppies",
    "a cathedral of ice",
]


class Frames(threading.Thread):
    """Reads the engine's shm output; keeps frame arrival times and the longest gap."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name = name
        self.count = 0
        self.last_at: float | None = None
        self.window_gap = 0.0  # longest gap since the last sample
        self.arrivals: list[float] = []
        self.stop = threading.Event()

    def take_gap(self) -> float:
        gap, self.window_gap = self.window_gap, 0.0
        if self.last_at is not None:  # a gap still open counts too
            gap = max(gap, time.monotonic() - self.last_at)
        return gap

    def run(self) -> None:
        reader, last = None, None
        while not self.stop.is_set():
            if reader is None:
                if not segment_exists(self.name):
                    time.sleep(0.01)
                    continue
                reader = ShmReader(self.name)
            try:
                got = reader.read(last)
            except BridgeError:
                reader.close()
                reader = None
                continue
            if got is None:
                time.sleep(0.002)
                continue
            last = got[1]
            now = time.monotonic()
            if self.last_at is not None:
                self.window_gap = max(self.window_gap, now - self.last_at)
            self.last_at = now
            self.count += 1
            self.arrivals.append(now)
        if reader is not None:
            reader.close()


class Feedback(FeedbackListener):
    """The latest value of every feedback address, and counts of echoes and errors."""

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, list] = {}
        self.counts: dict[str, int] = {}
        self.errors: list[tuple[float, str]] = []

    def received(self, at: float, address: str, args: list) -> None:
        self.latest[address] = args
        self.counts[address] = self.counts.get(address, 0) + 1
        if address == "/engine/error":
            self.errors.append((at, str(args[0])))

    def value(self, address: str, default: float = 0.0) -> float:
        args = self.latest.get(address)
        return float(args[0]) if args else default


#: The flood's mix: each kind in turn.
FLOOD_KINDS = ("random_bytes", "nan_guidance", "huge_prompt", "unknown_address", "deep_bundle", "bad_seed")


class Flood(threading.Thread):
    """20 s of hostile OSC at about 2,500 datagrams a second; the frame rate before and during."""

    def __init__(self, port: int, frames: Frames) -> None:
        super().__init__(daemon=True)
        self.port, self.frames = port, frames
        self.result: dict[str, float] = {}

    def run(self) -> None:
        start = time.monotonic()
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for sent, data in enumerate(hostile_datagrams(50_000, FLOOD_KINDS), start=1):
                sender.sendto(data, ("127.0.0.1", self.port))
                if sent % 125 == 0:
                    time.sleep(0.05)
                if time.monotonic() - start > 20:
                    break
        end = time.monotonic()
        before = rate(self.frames.arrivals, start - 20.0, start)
        during = rate(self.frames.arrivals, start, end)
        self.result = {
            "start_s": start,
            "end_s": end,
            "fps_before": round(before, 2),
            "fps_during": round(during, 2),
            "ratio": round(during / max(before, 1e-9), 3),
            "datagrams": sent,
        }


def rate(arrivals: list[float], start: float, end: float) -> float:
    return sum(1 for t in arrivals if start <= t < end) / max(end - start, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default="out/soak", help="folder for soak.csv, soak.png, summary.json")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="passed to latentstage run")
    parser.add_argument("--prompt-every", type=float, default=1.0, help="seconds between prompt changes")
    parser.add_argument("--scene-every", type=float, default=30.0, help="seconds between scene save+load")
    parser.add_argument("--flood", action="store_true", help="a 20 s OSC flood after the first minute")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # a config beside its own presets/ folder, so the soak's scenes stay out of the repository
    shutil.copy(REPO / "config.yaml", out / "config.yaml")
    (out / "presets").mkdir(exist_ok=True)
    shm_name = f"ls_soak_{os.getpid()}"
    osc_port = free_port()
    feedback = Feedback()
    feedback.start()
    frames = Frames(shm_name)
    frames.start()
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "run",
        "--config",
        str(out / "config.yaml"),
        "--preset",
        "demo",
        "--quiet",
        "--set",
        f"outputs=[{{type: shm, name: {shm_name}}}, {{type: record, path: '{out / 'soak.mp4'}', fps: 30}}]",
        *osc_flags(osc_port, feedback.port, status_hz=4),
        "--set",
        f"logging.file={out / 'engine.log'}",
    ]
    for item in args.sets:
        command += ["--set", item]
    engine = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    process = psutil.Process(engine.pid)
    osc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    started = time.monotonic()
    while frames.count == 0:
        if engine.poll() is not None:
            print(engine.communicate()[1][-3000:], file=sys.stderr)
            return 1
        if time.monotonic() - started > 120:
            print("the engine made no frame in 120 s", file=sys.stderr)
            engine.kill()
            return 1
        time.sleep(0.1)
    print(f"first frame after {time.monotonic() - started:.1f} s; soaking {args.minutes:g} min", flush=True)

    t0 = time.monotonic()
    end = t0 + 60.0 * args.minutes
    rows: list[dict[str, float]] = []
    prompt_index = scene_index = sent_prompts = 0
    next_prompt, next_scene, next_sample = t0, t0 + args.scene_every, t0 + 1.0
    flood_result: dict[str, float] | None = None
    flood: Flood | None = None
    flood_at = t0 + 60.0 if args.flood else None
    while time.monotonic() < end and engine.poll() is None:
        now = time.monotonic()
        if now >= next_prompt:
            prompt_index += 1
            osc.sendto(
                build_message("/prompt", [PROMPTS[prompt_index % len(PROMPTS)]]), ("127.0.0.1", osc_port)
            )
            sent_prompts += 1
            next_prompt += args.prompt_every
        if now >= next_scene:
            scene_index += 1
            osc.sendto(build_message("/preset/save", [f"soak_{scene_index % 4}"]), ("127.0.0.1", osc_port))
            if scene_index > 1:
                name = f"soak_{(scene_index - 1) % 4}"
                osc.sendto(build_message("/preset/load", [name]), ("127.0.0.1", osc_port))
            next_scene += args.scene_every
        if flood_at is not None and now >= flood_at:
            flood_at = None
            flood = Flood(osc_port, frames)
            flood.start()  # its own thread: the prompt a second and the sampling go on meanwhile
        if flood is not None and not flood.is_alive() and flood_result is None:
            flood_result = flood.result
            print(
                f"flood: {flood_result['fps_before']:.2f} fps before, {flood_result['fps_during']:.2f} "
                f"during ({flood_result['datagrams']} datagrams)",
                flush=True,
            )
        if now >= next_sample:
            rows.append(
                {
                    "t_s": round(now - t0, 1),
                    "rss_mb": round(process.memory_info().rss / 2**20, 1),
                    "fps": feedback.value("/engine/fps"),
                    "latency_ms": feedback.value("/engine/latency_ms"),
                    "longest_gap_ms": round(1000.0 * frames.take_gap(), 1),
                    "frames": frames.count,
                    "errors": len(feedback.errors),  # every /engine/error so far (flood included)
                }
            )
            next_sample += 1.0
            if len(rows) % 60 == 0:
                row = rows[-1]
                print(
                    f"{row['t_s'] / 60:5.1f} min  rss {row['rss_mb']:7.1f} MB  {row['fps']:5.2f} fps  "
                    f"latency {row['latency_ms']:6.1f} ms  gap {row['longest_gap_ms']:6.0f} ms",
                    flush=True,
                )
        time.sleep(0.02)

    crashed = engine.poll() is not None
    stop_start = time.monotonic()
    if not crashed:
        engine.send_signal(signal.SIGINT)
    _, err = engine.communicate(timeout=60)
    stop_s = time.monotonic() - stop_start
    frames.stop.set()
    feedback.stop.set()
    frames.join(5)
    feedback.join(5)

    with open(out / "soak.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["t_s"])
        writer.writeheader()
        writer.writerows(rows)
    steady = rows[len(rows) // 10 :] or rows  # after the first tenth (warm-up, first allocations)
    gaps = sorted(r["longest_gap_ms"] for r in rows)
    flooding = (flood_result["start_s"], flood_result["end_s"] + 1.0) if flood_result else (0.0, 0.0)
    calm_errors = [text for at, text in feedback.errors if not flooding[0] <= at <= flooding[1]]
    if flood_result:
        for key in ("start_s", "end_s"):
            flood_result[key] = round(flood_result[key] - t0, 1)
    latencies = sorted(r["latency_ms"] for r in steady)
    summary = {
        "minutes": round((rows[-1]["t_s"] if rows else 0) / 60, 2),
        "crashed": crashed,
        "exit_status": engine.returncode,
        "stop_seconds": round(stop_s, 2),
        "rss_mb_first": rows[0]["rss_mb"] if rows else None,
        "rss_mb_after_warmup": steady[0]["rss_mb"] if steady else None,
        "rss_mb_last": rows[-1]["rss_mb"] if rows else None,
        "rss_mb_max": max(r["rss_mb"] for r in rows) if rows else None,
        "fps_mean": round(sum(r["fps"] for r in steady) / len(steady), 2) if steady else None,
        "fps_min": round(min(r["fps"] for r in steady), 2) if steady else None,
        "latency_ms_mean": round(sum(latencies) / len(latencies), 1) if latencies else None,
        "latency_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "longest_gap_ms": gaps[-1] if gaps else None,
        "gap_ms_p99": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None,
        "frames": frames.count,
        "prompt_changes_sent": sent_prompts,
        "prompt_echoes": feedback.counts.get("/prompt", 0),
        "scene_saves": scene_index,
        "scene_echoes": feedback.counts.get("/preset/save", 0) + feedback.counts.get("/preset/load", 0),
        "engine_errors_outside_flood": len(calm_errors),
        "first_errors": calm_errors[:5],
        "flood": flood_result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, out / "soak.png", args.minutes)
    print(json.dumps(summary, indent=2))
    if crashed:
        print(err[-3000:], file=sys.stderr)
    return 0 if not crashed and engine.returncode == 0 else 1


def plot(rows: list[dict[str, float]], path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    for ax, key, label in zip(
        axes,
        ("rss_mb", "fps", "latency_ms", "longest_gap_ms"),
        ("RSS (MB)", "fps", "latency (ms)", "longest frame gap per s (ms)"),
    ):
        ax.plot(t, [r[key] for r in rows], linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"latentstage soak: {minutes:g} min of the demo, a prompt a second, a scene every 30 s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
