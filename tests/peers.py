"""Helpers that start, watch and listen to a real engine process (signals, crashes, supervisor)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bridges.base import BridgeError
from bridges.shm import ShmReader, segment_exists

REPO = Path(__file__).resolve().parents[1]


def demo_args(tmp_path, shm_name: str, frames: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """`run` of the demo preset at 64x64 into a recording and a shm segment, OSC off."""
    args = [
        "run",
        "--preset",
        "demo",
        "--quiet",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
        "--set",
        "input.width=64",
        "--set",
        "input.height=64",
        "--set",
        f"outputs=[{{type: record, path: '{tmp_path / 'demo.mp4'}', fps: 30}}, "
        f"{{type: shm, name: {shm_name}}}]",
        "--set",
        "osc.enabled=false",
        *extra,
    ]
    if frames is not None:
        args += ["--frames", str(frames)]
    return args


class ShmWatcher(threading.Thread):
    """Reads every frame it can from a shm segment while the engine runs (sequence, arrival time)."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name = name
        self.sequences: list[int] = []
        self.times: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        reader = None
        last = None
        while not self.stop.is_set():
            if reader is None:
                if segment_exists(self.name):
                    reader = ShmReader(self.name)
                else:
                    time.sleep(0.005)
                    continue
            try:
                got = reader.read(last)
            except BridgeError:  # the writer closing at the end
                break
            if got is None:
                time.sleep(0.001)
                continue
            _, last, _ = got
            self.sequences.append(last)
            self.times.append(time.monotonic())
        if reader is not None:
            reader.close()


def decoded_frames(path: Path) -> int:
    """Frames PyAV decodes from ``path``; any decoding error fails the test."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def wait_for_recording(path: Path, timeout: float = 90.0) -> None:
    """Until ``path`` holds at least one frame a decoder can read (the first fragment of a
    fragmented MP4 is complete): what a crash after this point must not lose."""
    import av

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(av.error.FFmpegError, OSError):
            if path.exists() and decoded_frames(path) > 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{path} never held a decodable frame")


def start_engine(args: list[str], **popen) -> subprocess.Popen[str]:
    """``python -m engine.cli ARGS`` (what the console script runs), stderr captured."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO, text=True, **popen)


def wait_for_segment(proc: subprocess.Popen[str], name: str, timeout: float = 90.0) -> None:
    """Until the engine's shm output exists (its first frame went out)."""
    deadline = time.monotonic() + timeout
    while not segment_exists(name):
        if proc.poll() is not None:
            raise AssertionError(f"engine exited with {proc.returncode}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("engine never produced a frame")
        time.sleep(0.05)


def kill_quietly(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def remove_segment(name: str) -> None:
    """What a SIGKILLed writer leaves behind (POSIX shared memory lives in /dev/shm)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")
