"""Second process for the shared-memory tests: ``writer NAME W H SECONDS [FPS]`` or ``reader NAME``.

writer: creates the segment, prints ``ready``, then writes frames (flat out, or at FPS when
given and > 0) until SECONDS pass or a line / EOF arrives on stdin; frame ``i`` (1, 2, ...)
has every byte equal to ``i % 251`` except the first 8, which hold ``i`` (u64 little-endian).
Prints ``done <frames>`` after closing the segment.
reader: attaches, waits up to 10 s for a frame, prints ``read <sequence> <counter>``, exits.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from bridges.shm import ShmReader, ShmWriter


def fill(frame: np.ndarray, counter: int) -> None:
    flat = frame.reshape(-1)
    flat.fill(counter % 251)
    flat[:8] = np.frombuffer(counter.to_bytes(8, "little"), dtype=np.uint8)


def writer(name: str, width: int, height: int, seconds: float, fps: float) -> int:
    stop = threading.Event()

    def wait_for_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    frame = np.empty((height, width, 4), dtype=np.uint8)
    count = 0
    with ShmWriter(name, width, height) as shm:
        print("ready", flush=True)
        threading.Thread(target=wait_for_stdin, daemon=True).start()
        start = time.monotonic()
        end = start + seconds
        while not stop.is_set() and time.monotonic() < end:
            count += 1
            fill(frame, count)
            shm.write(frame)
            if fps > 0:
                delay = start + count / fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    print(f"done {count}", flush=True)
    return 0


def reader(name: str) -> int:
    with ShmReader(name) as shm:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            result = shm.read()
            if result is not None:
                pixels, sequence, _stamp = result
                counter = int.from_bytes(pixels.reshape(-1)[:8].tobytes(), "little")
                print(f"read {sequence} {counter}", flush=True)
                return 0
            time.sleep(0.001)
    print("no frame", flush=True)
    return 1


def main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[0] == "writer":
        fps = float(argv[5]) if len(argv) > 5 else 0.0
        return writer(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), fps)
    if len(argv) == 2 and argv[0] == "reader":
        return reader(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
