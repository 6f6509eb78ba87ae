"""Tests for the shared-memory frame format, reader/writer and the shm bridges."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest

from bridges.base import BridgeError, Frame, FrameSink, FrameSource, SourceClosed
from bridges.shm import (
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    ShmHeader,
    ShmPixelFormat,
    ShmReader,
    ShmSink,
    ShmSource,
    ShmWriter,
    segment_exists,
)

PEER = Path(__file__).resolve().parent / "shm_peer.py"
ROOT = PEER.parent.parent


@pytest.fixture
def name() -> Iterator[str]:
    """A unique segment name (short enough for macOS), removed after the test if left over."""
    segment = f"ls{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield segment
    if segment_exists(segment):
        with contextlib.suppress(FileNotFoundError):
            leftover = SharedMemory(name=segment)
            leftover.close()
            leftover.unlink()
        pytest.fail(f"segment {segment} was left behind")


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)


def _consistent(pixels: np.ndarray) -> tuple[bool, int]:
    """(every byte after the counter equals counter % 251, counter) for a shm_peer frame."""
    flat = pixels.reshape(-1)
    counter = int.from_bytes(flat[:8].tobytes(), "little")
    return bool((flat[8:] == counter % 251).all()), counter


# -- format ----------------------------------------------------------------------------------


def test_header_round_trip_and_layout() -> None:
    header = ShmHeader(640, 360, ShmPixelFormat.BGRA8, flags=0, writer_pid=4242,
                       sequence=10, timestamp_ns=123_456_789_000, segment_id=0xDEADBEEF)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE == HEADER_STRUCT.size == 64
    assert ShmHeader.unpack(packed) == header
    assert ShmHeader.unpack(packed, segment_size=64 + 640 * 360 * 4) == header
    # The documented offsets, read independently of the struct definition.
    assert packed[:8] == MAGIC == b"LSFRAME1"
    assert struct.unpack_from("<HHIIHHII", packed, 8) == (1, 64, 640, 360, 1, 0, 2560, 4242)
    assert struct.unpack_from("<QQQQ", packed, 32) == (10, 123_456_789_000, 2560 * 360,
                                                       0xDEADBEEF)
    assert header.stride == 640 * 4 and header.data_size == 640 * 360 * 4


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, b"NOTFRAME"), "magic"),
        ((8, struct.pack("<H", 2)), "version"),
        ((12, struct.pack("<I", 0)), "size"),
        ((20, struct.pack("<H", 9)), "pixel_format"),
        ((24, struct.pack("<I", 3)), "stride"),
    ],
)
def test_header_validation(patch: tuple[int, bytes], message: str) -> None:
    packed = bytearray(ShmHeader(16, 8).pack())
    offset, data = patch
    packed[offset : offset + len(data)] = data
    with pytest.raises(BridgeError, match=message):
        ShmHeader.unpack(packed)


def test_header_larger_than_segment_is_rejected() -> None:
    with pytest.raises(BridgeError, match="smaller"):
        ShmHeader.unpack(ShmHeader(16, 8).pack(), segment_size=100)
    with pytest.raises(BridgeError, match="too small"):
        ShmHeader.unpack(b"LSFRAME1")


# -- reader / writer in one process ----------------------------------------------------------


def test_write_read_in_process(name: str) -> None:
    with ShmWriter(name, 16, 8) as writer:
        assert segment_exists(name)
        with ShmReader(name) as reader:
            assert reader.read() is None  # no frame yet
            first = _pixels(8, 16, 1)
            assert writer.write(first, timestamp_ns=111) == 1
            result = reader.read()
            assert result is not None
            pixels, sequence, stamp = result
            assert np.array_equal(pixels, first) and (sequence, stamp) == (1, 111)
            pixels[:] = 0  # a copy, not a view of the segment
            assert reader.read(last_sequence=1) is None
            second = _pixels(8, 16, 2)
            before = time.time_ns()
            writer.write(second)
            result = reader.read(last_sequence=1)
            assert result is not None and result[1] == 2
            assert np.array_equal(result[0], second)
            assert before <= result[2] <= time.time_ns()  # wall clock, as documented
            assert reader.header is not None and reader.header.width == 16
            with pytest.raises(ValueError, match="shape"):
                writer.write(np.zeros((8, 15, 4), np.uint8))
    assert not segment_exists(name)
    writer.close()  # twice is fine
    reader.close()


def test_reader_without_segment_raises(name: str) -> None:
    assert not segment_exists(name)
    with pytest.raises(BridgeError, match=name):
        ShmReader(name)


@pytest.mark.skipif(os.name != "posix", reason="POSIX shm_open/ftruncate are two steps")
def test_reader_started_while_the_writer_creates_the_segment_attaches_later(name, monkeypatch):
    """A reader that found the name between the writer's shm_open and ftruncate (size 0) raised
    'cannot mmap an empty file' and gave up: the SIGKILL fault test's watcher lost every frame."""
    import _posixshmem

    import bridges.shm as shm

    os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    reader = ShmReader(name)  # an empty segment is one being created, not an error
    try:
        assert reader.read() is None and reader.header is None
        with ShmWriter(name, 8, 8) as writer:  # replaces the empty name (as a real writer's
            writer.write(_pixels(8, 8, 5))     # ftruncate would fill it)
            got = reader.read()
            assert got is not None and got[1] == 1
            assert np.array_equal(got[0], _pixels(8, 8, 5))
    finally:
        reader.close()
    # a name that stays empty is a writer that died creating it: gone after the grace period
    os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    try:
        monkeypatch.setattr(shm, "_GONE_GRACE_S", 0.0)
        with ShmReader(name) as stuck:
            time.sleep(0.01)
            with pytest.raises(BridgeError, match="gone"):
                stuck.read()
    finally:
        _posixshmem.shm_unlink("/" + name)


def test_reader_follows_resize_and_writer_close(name: str) -> None:
    writer = ShmWriter(name, 8, 8)
    reader = ShmReader(name)
    writer.write(_pixels(8, 8, 3))
    assert reader.read() is not None
    writer.resize(12, 6)
    assert reader.read(last_sequence=1) is None  # re-attached, nothing written yet
    frame = _pixels(6, 12, 4)
    writer.write(frame)
    result = reader.read(last_sequence=1)  # the new segment counts from 1 again
    assert result is not None and result[1] == 1 and np.array_equal(result[0], frame)
    writer.close()
    assert not segment_exists(name)
    deadline = time.monotonic() + 5
    with pytest.raises(BridgeError, match="gone"):
        while time.monotonic() < deadline:
            reader.read()
            time.sleep(0.01)
    reader.close()


def test_stale_segment_is_replaced_and_old_writer_stops(name: str) -> None:
    old = ShmWriter(name, 8, 8)
    reader = ShmReader(name)
    old.write(_pixels(8, 8, 5))
    new = ShmWriter(name, 4, 4)  # e.g. a restarted writer finding a leftover segment
    with pytest.raises(BridgeError, match="taken over"):
        old.write(_pixels(8, 8, 6))
    old.close()  # must not unlink the new writer's segment
    assert segment_exists(name)
    frame = _pixels(4, 4, 7)
    new.write(frame)
    result = reader.read()
    assert result is not None and np.array_equal(result[0], frame)
    new.close()
    reader.close()


def test_reader_follows_a_re_created_segment(name: str) -> None:
    """A writer that vanished without retiring its segment (crash) and was restarted."""
    old = ShmWriter(name, 8, 8)
    reader = ShmReader(name)
    old.write(_pixels(8, 8, 8))
    assert reader.read() is not None
    gone = SharedMemory(name=name)  # what a crashed writer's resource tracker does
    gone.close()
    gone.unlink()
    new = ShmWriter(name, 8, 8)
    frame = _pixels(8, 8, 9)
    new.write(frame)
    result = None
    deadline = time.monotonic() + 5
    while result is None and time.monotonic() < deadline:
        result = reader.read(last_sequence=1)  # the probe runs after ~1 s without frames
        time.sleep(0.01)
    assert result is not None and np.array_equal(result[0], frame)
    old.close()  # the name is the new writer's now: left alone
    assert segment_exists(name)
    new.close()
    reader.close()


# -- two processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def writer_peer(name: str, *args: str, stderr: int = subprocess.DEVNULL) -> Iterator[subprocess.Popen[str]]:
    """``shm_peer.py writer name *args`` (width height fps [frames]) once it said ``ready``;
    killed at the end if it still runs."""
    writer = subprocess.Popen(
        [sys.executable, str(PEER), "writer", name, *args],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        yield writer
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def test_two_processes_tear_free_and_reader_exit_keeps_segment(name: str) -> None:
    width, height = 160, 120
    with writer_peer(name, str(width), str(height), "60", stderr=subprocess.PIPE) as writer:
        assert writer.stdin is not None
        reader = ShmReader(name)
        accepted, read_calls, last = 0, 0, None
        counters: list[int] = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            read_calls += 1
            result = reader.read(last)
            if result is None:
                continue
            pixels, sequence, _stamp = result
            ok, counter = _consistent(pixels)
            assert ok, f"torn frame accepted: sequence {sequence}, counter {counter}"
            assert counter == sequence  # the writer's i-th frame is frame number i
            assert last is None or sequence > last
            last = sequence
            counters.append(counter)
            accepted += 1
        assert accepted >= 10, f"only {accepted} frames accepted in {read_calls} reads"
        assert counters == sorted(set(counters)), f"{accepted} frames, not increasing"

        # Another process attaches, reads one frame and exits ...
        peer = subprocess.run([sys.executable, str(PEER), "reader", name], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert peer.returncode == 0, peer.stdout + peer.stderr
        assert peer.stdout.startswith("read "), peer.stdout
        assert "leaked" not in peer.stderr, peer.stderr
        time.sleep(0.5)  # give its resource tracker time to (wrongly) clean up
        # ... and the writer's segment is still there, still updating.
        assert segment_exists(name)
        with ShmReader(name) as fresh:
            seen: list[int] = []
            deadline = time.monotonic() + 5
            while len(seen) < 3 and time.monotonic() < deadline:
                result = fresh.read(seen[-1] if seen else None)
                if result is not None:
                    assert _consistent(result[0])[0]
                    seen.append(result[1])
            assert len(seen) == 3 and seen[0] > counters[-1], seen
        assert writer.poll() is None, "the writer stopped early"
        writer.stdin.write("stop\n")
        writer.stdin.flush()
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err
        assert out.strip().startswith("done"), out
        assert not segment_exists(name)
        reader.close()


def test_source_reports_a_crashed_writer(name: str) -> None:
    with writer_peer(name, "32", "16", "60", "200") as writer:
        source = ShmSource(name)
        assert source.recv(2.0) is not None
        writer.kill()  # no close(): its resource tracker unlinks the name
        writer.wait()
        start = time.monotonic()
        with pytest.raises(BridgeError, match=name):
            while time.monotonic() - start < 10:
                source.recv(0.05)
        source.close()


# -- bridges ---------------------------------------------------------------------------------


def test_sink_and_source_in_process(name: str) -> None:
    # (open_sink("shm", name=...) collides with open_sink's own ``name`` parameter.)
    sink = ShmSink(name)
    assert isinstance(sink, FrameSink)
    with pytest.raises(BridgeError, match=name):
        ShmSource(name)  # no writer yet
    first = _pixels(24, 32, 10)
    sink.send(Frame(first))
    with ShmSource(name) as source:
        assert isinstance(source, FrameSource)
        got = source.recv(1.0)
        assert got is not None and np.array_equal(got.pixels, first)
        assert abs(got.timestamp - time.monotonic()) < 1.0
        start = time.monotonic()
        assert source.recv(0.02) is None  # nothing new: waits about the timeout
        assert 0.015 <= time.monotonic() - start < 0.5
        second = _pixels(24, 32, 11)
        sink.send(Frame(second))
        got2 = source.recv(1.0)
        assert got2 is not None and np.array_equal(got2.pixels, second)
        assert got2.sequence > got.sequence
        # A size change re-creates the segment; the source follows it.
        resized = _pixels(40, 20, 12)
        sink.send(Frame(resized))
        got3 = source.recv(2.0)
        assert got3 is not None and got3.pixels.shape == (40, 20, 4)
        assert np.array_equal(got3.pixels, resized)
        assert got3.sequence > got2.sequence
        sink.send(Frame(_pixels(40, 20, 13)))
        got4 = source.recv(1.0)
        assert got4 is not None and got4.sequence > got3.sequence
        # The writer goes away: the source reports it so the runtime can retry.
        sink.close()
        sink.close()
        assert not segment_exists(name)
        with pytest.raises(BridgeError):
            for _ in range(100):
                source.recv(0.05)
    source.close()
    with pytest.raises(SourceClosed):
        source.recv(0)


def test_source_converts_bgra(name: str) -> None:
    bgra = _pixels(4, 6, 20)
    with ShmWriter(name, 6, 4, ShmPixelFormat.BGRA8) as writer:
        writer.write(bgra)
        with ShmSource(name) as source:
            frame = source.recv(1.0)
    assert frame is not None
    assert np.array_equal(frame.pixels, bgra[..., [2, 1, 0, 3]])
