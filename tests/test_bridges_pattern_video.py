"""Tests for the pattern source, the video file source and the record sink."""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bridges.base import (
    BridgeError,
    BridgeUnavailable,
    Frame,
    FrameSink,
    FrameSource,
    SourceClosed,
    open_source,
)
from bridges.pattern import PatternSource

ROOT = Path(__file__).resolve().parent.parent


def _mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a[..., :3].astype(np.int16) - b[..., :3].astype(np.int16)).mean())


# -- pattern ---------------------------------------------------------------------------------


def test_pattern_frames_are_rgba_and_move() -> None:
    with PatternSource(fps=1000, width=96, height=64) as source:
        assert isinstance(source, FrameSource)
        frames = [source.recv(1.0) for _ in range(5)]
    assert all(f is not None for f in frames)
    pixels = [f.pixels for f in frames if f is not None]
    for p in pixels:
        assert p.shape == (64, 96, 4)
        assert p.dtype == np.uint8
        assert p.flags["C_CONTIGUOUS"]
        assert (p[..., 3] == 255).all()
        assert len(np.unique(p.reshape(-1, 4), axis=0)) > 16  # never a flat image
    for a, b in itertools.pairwise(pixels):
        assert (a != b).any(axis=2).mean() > 0.01
    sequences = [f.sequence for f in frames if f is not None]
    assert sequences == sorted(set(sequences))


def test_pattern_render_is_fast_enough_and_deterministic() -> None:
    source = PatternSource()
    assert np.array_equal(source.render(7), source.render(7))
    start = time.perf_counter()
    for i in range(10):
        source.render(i)
    # A behaviour check (vectorised, not per pixel), far from a benchmark bound.
    assert (time.perf_counter() - start) / 10 < 0.05


def test_pattern_is_paced() -> None:
    source = PatternSource(fps=60, width=32, height=32)
    start = time.monotonic()
    got = [source.recv(1.0) for _ in range(30)]
    elapsed = time.monotonic() - start
    assert all(f is not None for f in got)
    assert elapsed >= 0.35, f"30 frames at 60 fps came in {elapsed:.3f} s"  # paced, not faster


def test_pattern_recv_returns_none_when_not_due() -> None:
    source = PatternSource(fps=2, width=16, height=16)
    assert source.recv(0) is not None  # the first frame is due at once
    start = time.monotonic()
    assert source.recv(0) is None
    assert source.recv(0.02) is None  # waits at most the timeout
    assert time.monotonic() - start < 0.4


def test_pattern_late_caller_skips_ahead_without_burst() -> None:
    period = 1 / 20
    source = PatternSource(fps=20, width=16, height=16)
    first = source.recv(1.0)
    assert first is not None and first.sequence == 0
    time.sleep(0.13)  # miss two frames
    late = source.recv(1.0)
    assert late is not None and late.sequence >= 2
    following = source.recv(1.0)
    assert following is not None and following.sequence == late.sequence + 1
    # The next frame still waits for its own slot on the original schedule (no burst).
    assert following.timestamp - first.timestamp >= following.sequence * period - 0.01


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -5}, "-5"),
        ({"fps": math.nan}, "nan"),
        ({"fps": "30"}, "'30'"),
        ({"fps": 5000}, "5000"),
        ({"width": 0}, "width"),
        ({"width": 4}, "4"),
        ({"height": 100_000}, "100000"),
        ({"width": 12.5}, "12.5"),
        ({"height": True}, "True"),
    ],
)
def test_pattern_rejects_bad_arguments(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match="must be") as info:
        PatternSource(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_pattern_repr_close_and_registry() -> None:
    source = open_source("pattern", fps=10, width=32, height=24)
    assert isinstance(source, PatternSource)
    assert "test pattern" in repr(source) and "test pattern" in str(source)
    assert "32x24" in str(source)
    source.close()
    source.close()
    with pytest.raises(SourceClosed):
        source.recv(0)
    from bridges import pattern

    assert pattern.unavailable_reason() is None


def test_bridges_import_no_engine_torch_or_av() -> None:
    code = (
        "import sys, bridges.base, bridges.pattern, bridges.video, bridges.record, bridges.shm\n"
        "bad = [m for m in ('torch', 'engine', 'av') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- video / record --------------------------------------------------------------------------

av = pytest.importorskip("av")

from bridges import record, video  # noqa: E402
from bridges.record import RecordSink  # noqa: E402
from bridges.video import VideoSource  # noqa: E402


def _write_clip(path: Path, frames: list[np.ndarray], fps: float, codec: str = "libx264"
                ) -> RecordSink:
    """One file frame per picture: each is stamped with its own slot's capture time."""
    with RecordSink(str(path), fps=fps, codec=codec) as sink:
        assert isinstance(sink, FrameSink)
        for i, pixels in enumerate(frames):
            sink.send(Frame(pixels, i / fps, sequence=i))
    return sink


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """Two seconds of the pattern, 64x48 at 20 fps."""
    pattern = PatternSource(fps=20, width=64, height=48)
    frames = [pattern.render(i) for i in range(40)]
    path = tmp_path_factory.mktemp("video") / "nested" / "clip.mp4"
    sink = _write_clip(path, frames, fps=20)
    assert sink.frames_written == 40
    return path, frames


def _read_all(source: VideoSource, limit: int = 1000) -> list[Frame]:
    frames: list[Frame] = []
    with pytest.raises(SourceClosed):
        for _ in range(limit):
            frame = source.recv(1.0)
            if frame is not None:
                frames.append(frame)
    return frames


def test_record_then_read_back(clip: tuple[Path, list[np.ndarray]]) -> None:
    path, written = clip
    assert path.is_file()  # the parent folder was created
    with VideoSource(str(path), loop=False) as source:
        assert isinstance(source, FrameSource)
        assert source.fps == pytest.approx(20.0)
        assert (source.width, source.height) == (64, 48)
        start = time.monotonic()
        frames = _read_all(source)
        elapsed = time.monotonic() - start
        with pytest.raises(SourceClosed):  # and it stays closed
            source.recv(0)
    assert len(frames) == len(written)
    assert [f.sequence for f in frames] == list(range(len(written)))
    for frame in frames:
        assert frame.pixels.shape == (48, 64, 4) and frame.pixels.dtype == np.uint8
        assert frame.pixels.flags["C_CONTIGUOUS"]
    errors = [_mean_abs_error(f.pixels, w) for f, w in zip(frames, written)]
    # 64x48 with hard colour edges: most of the error is 4:2:0 chroma subsampling.
    assert max(errors) < 20, errors
    assert float(np.mean(errors)) < 14, errors
    # ... and each frame matches its own original better than its neighbours (order kept).
    shifted = [_mean_abs_error(f.pixels, w) for f, w in zip(frames[1:], written)]
    assert float(np.mean(errors)) < float(np.mean(shifted))
    # 40 frames at 20 fps: 39 periods = 1.95 s; paced, never faster (a busy machine is slower)
    assert elapsed >= 1.4, f"40 frames at 20 fps came in {elapsed:.2f} s"
    gaps = np.diff([f.timestamp for f in frames])
    assert float(np.median(gaps)) == pytest.approx(0.05, abs=0.015)


def test_video_recv_does_not_block_past_timeout(tmp_path: Path) -> None:
    path = tmp_path / "slow.mp4"
    _write_clip(path, [PatternSource(width=32, height=32).render(i) for i in range(3)], fps=2)
    with VideoSource(str(path), loop=True) as source:
        assert source.recv(2.0) is not None
        # the next frame is due in 500 ms: had either call waited for it, it would return it
        assert source.recv(0) is None
        assert source.recv(0.01) is None
        assert source.recv(2.0) is not None


def test_video_loops(tmp_path: Path) -> None:
    pattern = PatternSource(fps=50, width=64, height=48)
    written = [pattern.render(i * 5) for i in range(10)]
    path = tmp_path / "short.mp4"
    _write_clip(path, written, fps=50)
    with VideoSource(str(path), loop=True) as source:
        assert source.fps == pytest.approx(50.0)
        frames = []
        for _ in range(200):
            frame = source.recv(1.0)
            if frame is not None:
                frames.append(frame)
            if len(frames) == 25:
                break
    assert len(frames) == 25
    assert [f.sequence for f in frames] == list(range(25))
    for i, frame in enumerate(frames):
        errors = [_mean_abs_error(frame.pixels, w) for w in written]
        assert int(np.argmin(errors)) == i % 10, errors
    assert _mean_abs_error(frames[10].pixels, frames[0].pixels) < 3  # the same decoded frame


def test_video_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.mp4"
    with pytest.raises(BridgeError, match=r"missing\.mp4") as info:
        VideoSource(str(missing))
    assert str(missing) in str(info.value)


def test_video_unreadable_file_names_the_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(BridgeError) as info:
        VideoSource(str(junk))
    assert str(junk) in str(info.value)


@pytest.mark.parametrize(
    ("path", "codec", "option", "needle"),
    [
        ("take.xyz", "libx264", "path", "allowed: .avi, .m4v, .mkv, .mov, .mp4, .webm"),
        ("take", "libx264", "path", "has no extension"),
        ("take.mp4", "libx246", "codec", "not a video encoder of this PyAV build; allowed: "),
        ("take.webm", "libx264", "codec", "allowed: an encoder .webm files take, e.g. libvpx-vp9"),
    ],
)
def test_a_recording_that_cannot_be_written_is_refused_by_name(
    tmp_path: Path, path: str, codec: str, option: str, needle: str
) -> None:
    """`out/take.xyz` passed the start check and recorded nothing; a mistyped codec fell back
    to MPEG-4 silently."""
    problem = record.check_recording(str(tmp_path / path), codec)
    assert problem is not None and problem.option == option
    assert needle in str(problem), str(problem)
    if option == "path" or "not a video encoder" in needle:
        with pytest.raises(BridgeError, match=f"{option}: "):  # the sink refuses before any frame
            RecordSink(str(tmp_path / path), codec=codec)
    assert list(tmp_path.iterdir()) == []  # and writes nothing


@pytest.mark.parametrize(("path", "codec"), [("a.mp4", "libx264"), ("b.mkv", "mpeg4"), ("c.mov", "libx264")])
def test_a_recording_that_can_be_written_passes_the_check(tmp_path: Path, path: str, codec: str) -> None:
    assert record.check_recording(str(tmp_path / path), codec) is None
    assert list(tmp_path.iterdir()) == []  # tried in memory


def _colour(index: int) -> np.ndarray:
    """A 32x32 picture whose red channel says ``index`` (10 steps of 25)."""
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[..., 0] = 25 * index
    pixels[..., 3] = 255
    return pixels


def _reds(path: Path) -> list[int]:
    """The index each decoded frame shows (its red level / 25), in file order."""
    with VideoSource(str(path), loop=False) as source:
        return [round(float(f.pixels[..., 0].mean()) / 25) for f in _read_all(source)]


def test_a_slower_engine_is_repeated_so_the_file_plays_at_the_speed_of_the_show(tmp_path: Path) -> None:
    """Frames were stamped by a counter: 70 s of a 3.5 fps show played back in 8 s."""
    path = tmp_path / "slow.mp4"
    with RecordSink(str(path), fps=30) as sink:
        for index in range(10):  # 5 frames a second for 2 s
            sink.send(Frame(_colour(index), 0.2 * index, index))
    assert sink.frames_written == 9 * 6 + 1 and sink.frames_repeated == 9 * 5
    assert sink.seconds == pytest.approx(1.8 + 1 / 30)
    assert _reds(path) == [index for index in range(9) for _ in range(6)] + [9]


def test_a_faster_engine_is_dropped_and_jitter_neither_drops_nor_repeats(tmp_path: Path) -> None:
    fast = tmp_path / "fast.mp4"
    with RecordSink(str(fast), fps=10) as sink:
        for index in range(20):  # 20 fps for 1 s into a 10 fps file
            sink.send(Frame(_colour(index // 2), 0.05 * index, index))
    # each slot k >= 1 takes the frame nearest its time (index 2k - 1, half a slot early)
    assert (sink.frames_written, sink.frames_dropped, sink.frames_repeated) == (11, 9, 0)
    assert _reds(fast) == [0, *range(10)]
    jitter = np.random.default_rng(1).uniform(-0.4, 0.4, 30)  # up to 40 % of a frame early or late
    steady = tmp_path / "jitter.mp4"
    with RecordSink(str(steady), fps=10) as sink:
        for index in range(30):
            sink.send(Frame(_colour(index % 10), (index + jitter[index]) / 10 + 5.0, index))
    assert (sink.frames_written, sink.frames_dropped, sink.frames_repeated) == (30, 0, 0)


def test_the_file_covers_the_wall_time_from_its_opening_to_its_closing(tmp_path: Path) -> None:
    """Black before the first frame (the sink opened, nothing to show yet), the last frame held
    until close: the file's duration is the wall time it covers, to a frame."""
    path = tmp_path / "wall.mp4"
    opened = time.monotonic() - 2.0  # as if the runtime opened it 2 s ago
    sink = RecordSink(str(path), fps=20, origin=opened)
    sink.send(Frame(_colour(4), opened + 0.5, 0))
    sink.send(Frame(_colour(8), opened + 1.0, 1))
    before = time.monotonic()
    sink.close()
    after = time.monotonic()
    assert before - opened - 0.05 <= sink.seconds <= after - opened + 0.05
    reds = _reds(path)
    assert reds[:10] == [0] * 10 and reds[10:20] == [4] * 10 and set(reds[20:]) == {8}
    assert len(reds) == sink.frames_written


def test_a_long_stall_jumps_the_clock_instead_of_encoding_it(tmp_path: Path) -> None:
    path = tmp_path / "stall.mp4"
    with RecordSink(str(path), fps=10) as sink:
        sink.send(Frame(_colour(1), 100.0, 0))
        sink.send(Frame(_colour(2), 160.0, 1))  # a minute later
    assert sink.frames_repeated == record.MAX_FILL_SECONDS * 10
    assert sink.frames_written == record.MAX_FILL_SECONDS * 10 + 2
    with av.open(str(path)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times[-1] == pytest.approx(60.0)  # still in time with the show


def test_a_reopened_recording_announces_its_new_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log said "recording continues in take-2.xyz" once per output frame."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    opener = record.RecordingOpener({"path": str(tmp_path / "take.mp4"), "fps": 30.0, "codec": "libx264"}, {})
    opener().close()
    (tmp_path / "take.mp4").write_bytes(b"a take")
    opener.options["path"] = str(tmp_path / "take.mp4")
    with caplog.at_level(logging.WARNING, logger="bridges.record"):
        for _ in range(5):  # the runtime retries a take that cannot get its file
            opener().close()
    moves = [r for r in caplog.records if "continues in" in r.getMessage()]
    assert len(moves) == 1 and "take-2.mp4" in moves[0].getMessage()


def test_record_close_twice_and_send_after_close(tmp_path: Path) -> None:
    sink = RecordSink(str(tmp_path / "twice.mp4"), fps=10)
    sink.send(Frame(PatternSource(width=16, height=16).render(0)))
    sink.close()
    sink.close()
    assert sink.frames_written == 1
    with pytest.raises(BridgeError, match="closed"):
        sink.send(Frame(np.zeros((16, 16, 4), np.uint8)))
    empty = RecordSink(str(tmp_path / "empty.mp4"))
    empty.close()
    empty.close()
    assert empty.frames_written == 0


def test_record_letterboxes_a_size_change_into_the_same_file(tmp_path: Path) -> None:
    """A live resolution change (or bypass of a larger input) must not end the recording."""
    path = tmp_path / "size.mp4"
    red = np.zeros((48, 64, 4), np.uint8)
    red[..., 0] = red[..., 3] = 255
    wide = np.zeros((32, 128, 4), np.uint8)  # 4:1, twice as wide as the file's 4:3
    wide[..., 2] = wide[..., 3] = 255
    with RecordSink(str(path), fps=10) as sink:
        for index, pixels in enumerate((red, wide, wide, red)):
            sink.send(Frame(pixels, index / 10))
    assert sink.frames_written == 4
    with VideoSource(str(path), loop=False) as source:
        assert (source.width, source.height) == (64, 48)
        frames = _read_all(source)
    assert len(frames) == 4
    scaled = frames[1].pixels.astype(int)
    # 128x32 fits as 64x16 at y = 16: blue band in the middle, black bars above and below
    assert scaled[20:28, 8:56, 2].mean() > 200 and scaled[20:28, 8:56, 0].mean() < 40
    assert scaled[:12, :, :3].max() < 40 and scaled[36:, :, :3].max() < 40
    assert frames[3].pixels[..., 0].mean() > 200  # back to the recording's own size


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        ((64, 48), (64, 48), (64, 48, 0, 0)),
        ((128, 32), (64, 48), (64, 16, 0, 16)),
        ((48, 96), (64, 48), (24, 48, 20, 0)),
        ((32, 24), (640, 480), (640, 480, 0, 0)),
        ((1000, 1), (64, 48), (64, 1, 0, 23)),
    ],
)
def test_fit_inside(size: tuple[int, int], box: tuple[int, int], expected: tuple[int, ...]) -> None:
    assert record.fit_inside(*size, *box) == expected


def test_record_odd_size_is_cropped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "odd.mp4"
    pattern = PatternSource(width=33, height=25)
    with caplog.at_level(logging.INFO, logger="bridges.record"):
        _write_clip(path, [pattern.render(i) for i in range(3)], fps=10)
    assert len([r for r in caplog.records if "is odd" in r.getMessage()]) == 1
    with VideoSource(str(path), loop=False) as source:
        assert (source.width, source.height) == (32, 24)


def test_record_rejects_bad_fps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fps"):
        RecordSink(str(tmp_path / "x.mp4"), fps=0)


def test_missing_pyav_raises_bridge_unavailable(
    clip: tuple[Path, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(BridgeUnavailable, match=r"latentstage\[video\]"):
        VideoSource(str(clip[0]))
    with pytest.raises(BridgeUnavailable, match=r"latentstage\[video\]"):
        RecordSink("unused.mp4")
    with pytest.raises(BridgeUnavailable, match="PyAV"):
        video.load_av()
    assert video.unavailable_reason() is not None
    assert record.unavailable_reason() is not None
    monkeypatch.undo()
    assert video.unavailable_reason() is None
    assert record.unavailable_reason() is None


def test_recording_survives_a_crash_before_close(tmp_path):
    """A killed engine never calls close(): the fragmented MP4 still plays up to the crash."""
    import subprocess
    import sys

    path = tmp_path / "crash.mp4"
    script = (
        "import os, numpy as np\n"
        "from bridges.base import Frame\n"
        "from bridges.record import RecordSink\n"
        f"sink = RecordSink(path={str(path)!r}, fps=30)\n"
        "rng = np.random.default_rng(0)\n"
        "for i in range(90):\n"
        "    pixels = rng.integers(0, 256, (128, 128, 4), dtype=np.uint8)\n"
        "    sink.send(Frame(pixels, i / 30, i))\n"
        "os._exit(1)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    av = pytest.importorskip("av")
    frames = 0
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            try:
                frames += len(packet.decode())
            except av.error.InvalidDataError:  # the fragment cut off by the crash
                break
    assert frames >= 30, f"only {frames} frames readable after a crash"
