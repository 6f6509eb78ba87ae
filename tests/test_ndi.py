"""Tests of bridges.ndi: name matching and pixel helpers, and a real NDI loopback on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridges import ndi
from bridges.base import BridgeError, BridgeUnavailable, Frame, PixelFormat

REPO = Path(__file__).resolve().parents[1]

#: NDI compresses (SpeedHQ, 4:2:2, BT.709). Measured here on flat colours and a smooth gradient:
#: max 16 (pure blue, 255 -> 239: colour-matrix rounding), gradient 10, red 4; mean 1.9.
MAX_PIXEL_ERROR = 20
MEAN_PIXEL_ERROR = 4.0


# --- name matching ---------------------------------------------------------------------------

SOURCES = ["STAGE-PC (TouchDesigner)", "STAGE-PC (Resolume Arena)", "LAPTOP (TouchDesigner 2)"]


def test_split_source_name() -> None:
    assert ndi.split_source_name("STAGE-PC (TouchDesigner)") == ("STAGE-PC", "TouchDesigner")
    assert ndi.split_source_name("HOST (a (b))") == ("HOST", "a (b)")
    assert ndi.split_source_name("plain") == ("plain", "")


def test_match_exact_full_name_wins() -> None:
    assert ndi.match_source("STAGE-PC (TouchDesigner)", SOURCES) == (
        "STAGE-PC (TouchDesigner)", True)


def test_match_stream_part_case_insensitive_beats_substring() -> None:
    # "touchdesigner" is a substring of two names but equals only one stream part.
    assert ndi.match_source("touchdesigner", SOURCES) == ("STAGE-PC (TouchDesigner)", False)
    assert ndi.match_source("stage-pc (touchdesigner)", SOURCES) == (
        "STAGE-PC (TouchDesigner)", False)


def test_match_unique_substring() -> None:
    assert ndi.match_source("resolume", SOURCES) == ("STAGE-PC (Resolume Arena)", False)
    assert ndi.match_source("designer 2", SOURCES) == ("LAPTOP (TouchDesigner 2)", False)


def test_match_ambiguous_lists_candidates() -> None:
    with pytest.raises(BridgeError) as err:
        ndi.match_source("stage-pc", SOURCES)
    assert "STAGE-PC (TouchDesigner)" in str(err.value)
    assert "STAGE-PC (Resolume Arena)" in str(err.value)
    assert "LAPTOP" not in str(err.value)


def test_match_same_stream_on_two_hosts_is_ambiguous() -> None:
    with pytest.raises(BridgeError, match="ambiguous"):
        ndi.match_source("TD", ["A (TD)", "B (TD)"])


def test_match_none_and_empty() -> None:
    assert ndi.match_source("Millumin", SOURCES) == (None, False)
    assert ndi.match_source("x", []) == (None, False)
    with pytest.raises(ValueError):
        ndi.match_source("  ", SOURCES)


# --- pixel helpers ---------------------------------------------------------------------------


def test_fourcc_layout() -> None:
    assert ndi.fourcc_layout("RGBA") == (PixelFormat.RGBA, False)
    assert ndi.fourcc_layout("RGBX") == (PixelFormat.RGBA, True)
    assert ndi.fourcc_layout("BGRA") == (PixelFormat.BGRA, False)
    assert ndi.fourcc_layout("BGRX") == (PixelFormat.BGRA, True)
    with pytest.raises(ValueError, match="UYVY"):
        ndi.fourcc_layout("UYVY")


def test_packed_rows_skips_row_padding() -> None:
    width, height, stride = 3, 2, 16  # 12 bytes of pixels + 4 of padding per row
    data = np.arange(stride * height, dtype=np.uint8)
    rows = ndi.packed_rows(data, width, height, stride)
    assert rows.shape == (2, 3, 4)
    assert rows[1, 0].tolist() == [16, 17, 18, 19]
    assert ndi.packed_rows(data[: stride + 12], width, height, stride)[1, 2].tolist() == [
        24, 25, 26, 27]
    with pytest.raises(ValueError):
        ndi.packed_rows(data[:20], width, height, stride)
    with pytest.raises(ValueError):
        ndi.packed_rows(data, 0, height, stride)


def test_received_to_rgba_orders_channels_and_fills_padding_alpha() -> None:
    bgra = np.array([[[10, 20, 30, 40], [50, 60, 70, 80]]], np.uint8)  # 2x1 BGRA
    rgba = ndi.received_to_rgba(bgra.reshape(-1), 2, 1, 8, "BGRA")
    assert rgba.tolist() == [[[30, 20, 10, 40], [70, 60, 50, 80]]]
    opaque = ndi.received_to_rgba(bgra.reshape(-1), 2, 1, 0, "RGBX")
    assert opaque.tolist() == [[[10, 20, 30, 255], [50, 60, 70, 255]]]
    assert opaque.flags.c_contiguous and opaque.flags.writeable
    data = bgra.reshape(-1)
    out = ndi.received_to_rgba(data, 2, 1, 8, "RGBA")
    out[0, 0, 0] = 99
    assert data[0] == 10  # a copy, never a view of the SDK buffer


def test_send_helpers() -> None:
    assert ndi.send_fourcc(True) == "RGBA"
    assert ndi.send_fourcc(False) == "RGBX"
    assert ndi.send_size(512, 512) == (512, 512)
    assert ndi.send_size(127, 71) == (126, 70)
    with pytest.raises(ValueError):
        ndi.send_size(1, 100)
    assert ndi.frame_rate(30) == Fraction(30)
    assert ndi.frame_rate(25.0) == Fraction(25)
    assert ndi.frame_rate(29.97) == Fraction(30000, 1001)
    assert ndi.frame_rate(59.94) == Fraction(60000, 1001)
    assert ndi.frame_rate(23.976) == Fraction(24000, 1001)
    assert ndi.frame_rate(12.5) == Fraction(25, 2)
    for bad in (0, -1, 5000, float("nan")):
        with pytest.raises(ValueError):
            ndi.frame_rate(bad)
    assert ndi.check_sender_name("  latentstage ") == "latentstage"
    for bad_name in ("", "   ", "out (1)"):
        with pytest.raises(ValueError):
            ndi.check_sender_name(bad_name)


def test_connection_watch() -> None:
    watch = ndi.ConnectionWatch("S", opened_at=0.0, connect_timeout=5.0, lost_after=3.0)
    assert watch.update(1.0, False) is None  # still connecting
    message = watch.update(5.0, False)
    assert message is not None and "could not connect" in message

    watch = ndi.ConnectionWatch("S", opened_at=0.0, connect_timeout=5.0, lost_after=3.0)
    assert watch.update(1.0, True) is None
    assert watch.update(100.0, True) is None  # connected but idle is fine
    assert watch.update(101.0, False) is None  # blip
    assert watch.update(102.0, True) is None  # back
    assert watch.update(103.0, False) is None
    assert watch.update(105.9, False) is None
    message = watch.update(106.0, False)
    assert message is not None and "disconnected" in message

    watch = ndi.ConnectionWatch("S", opened_at=0.0, connect_timeout=5.0, lost_after=3.0)
    watch.connected()  # a frame arrived
    assert watch.update(50.0, False) is None


# --- SDK missing / import hygiene ------------------------------------------------------------


def test_missing_cyndilib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cyndilib", None)
    assert ndi.unavailable_reason() == "cyndilib is not installed"
    for make in (lambda: ndi.NdiSource("HOST (TD)"), lambda: ndi.NdiSink("out"),
                 lambda: ndi.NdiAudioSource("HOST (Ableton)")):
        with pytest.raises(BridgeUnavailable) as err:
            make()
        assert "pip install latentstage[ndi]" in str(err.value)
        assert "cyndilib is not installed" in str(err.value)


def test_importing_the_module_imports_no_sdk_engine_or_torch() -> None:
    code = ("import sys, bridges.ndi; "
            "print([m for m in ('cyndilib', 'engine', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- real loopback ---------------------------------------------------------------------------


def _patterns(width: int, height: int) -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    out: dict[str, np.ndarray] = {}
    for name, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)),
                      ("gray", (128, 128, 128))):
        img = np.empty((height, width, 4), np.uint8)
        img[..., :3] = rgb
        img[..., 3] = 255
        out[name] = img
    gradient = np.empty((height, width, 4), np.uint8)
    gradient[..., 0] = x * 255 // (width - 1)
    gradient[..., 1] = y * 255 // (height - 1)
    gradient[..., 2] = 128
    gradient[..., 3] = 255
    out["gradient"] = gradient
    return out


class _Sender(threading.Thread):
    """Drives an NdiSink from its own thread at ``fps`` with frames from ``pick(i)``."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name_ = name
        self.frames: list[np.ndarray] = []
        self.fps = 30.0
        self.sent = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def play(self, frames: list[np.ndarray], fps: float) -> None:
        with self.lock:
            self.frames, self.fps = frames, fps

    def run(self) -> None:
        try:
            with ndi.NdiSink(self.name_, fps=60, alpha=True) as sink:
                start, i = time.perf_counter(), 0
                while not self.stop.is_set():
                    with self.lock:
                        frames, fps = self.frames, self.fps
                    sink.send(Frame(frames[i % len(frames)]))
                    self.sent += 1
                    i += 1
                    delay = start + i / fps - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        start, i = time.perf_counter(), 0
        except (RuntimeError, ValueError, OSError) as exc:  # reported through the JSON result
            self.error = exc


def _loopback_child(result_path: str) -> None:
    """Runs in a fresh process whose NDI_CONFIG_DIR points discovery at 127.0.0.1."""
    name = f"latentstage-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    result: dict[str, Any] = {"name": name}
    small = _patterns(128, 72)
    sender = _Sender(name)
    sender.play([small["red"]], 30)
    sender.start()
    try:
        t0 = time.monotonic()
        source = ndi.NdiSource(name, find_timeout=10, lost_after=1.0)
        result["found_as"] = source.name
        result["find_s"] = time.monotonic() - t0
        try:
            ndi.NdiSource(f"{name}-nobody", find_timeout=0.5)
            result["not_found_error"] = None
        except BridgeError as exc:
            result["not_found_error"] = str(exc)
        first = source.recv(5.0)
        assert first is not None, "no frame within 5 s"
        result["first_size"] = [first.width, first.height]
        result["first_rgb"] = first.pixels[..., :3].reshape(-1, 3).mean(axis=0).tolist()
        result["first_alpha"] = int(first.pixels[..., 3].min())

        # Distinct frames: each received one is compared with the pattern it is closest to.
        sender.play(list(small.values()), 30)
        time.sleep(0.2)
        received: list[np.ndarray] = []
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            frame = source.recv(0.5)
            if frame is not None:
                received.append(frame.pixels)
        errors = []
        for pixels in received:
            diffs = {k: np.abs(pixels.astype(np.int16) - v.astype(np.int16))
                     for k, v in small.items()}
            best = min(diffs, key=lambda k: float(diffs[k].mean()))
            errors.append((best, int(diffs[best].max()), float(diffs[best].mean())))
        result["frames"] = len(received)
        result["patterns_seen"] = sorted({e[0] for e in errors})
        result["max_error"] = max(e[1] for e in errors)
        result["mean_error"] = float(np.mean([e[2] for e in errors]))
        result["max_error_by_pattern"] = {
            k: max(e[1] for e in errors if e[0] == k) for k in {e[0] for e in errors}}

        # Throughput at 512x512: the sink re-creates its sender for the new size, the
        # receiver follows it; count new frames over 2 s while sending flat out (<= 60 fps).
        big = [np.roll(_patterns(512, 512)["gradient"], 16 * k, axis=1) for k in range(8)]
        sender.play(big, 60)
        until = time.monotonic() + 6.0
        while time.monotonic() < until:
            frame = source.recv(0.5)
            if frame is not None and frame.width == 512:
                break
        else:
            raise AssertionError("no 512x512 frame within 6 s of the size change")
        count, sent0, t1 = 0, sender.sent, time.perf_counter()
        while time.perf_counter() - t1 < 2.0:
            if source.recv(0.2) is not None:
                count += 1
        elapsed = time.perf_counter() - t1
        result["fps_512"] = count / elapsed
        result["sent_fps_512"] = (sender.sent - sent0) / elapsed

        # The sender goes away: recv must report the source lost (lost_after=1 s).
        sender.stop.set()
        sender.join(5)
        t2 = time.monotonic()
        try:
            while time.monotonic() - t2 < 8.0:
                source.recv(0.5)
            result["lost_error"] = None
        except BridgeError as exc:
            result["lost_error"] = str(exc)
            result["lost_after_s"] = time.monotonic() - t2
        source.close()
        source.close()  # twice is fine
    finally:
        sender.stop.set()
        sender.join(5)
        result["sender_error"] = None if sender.error is None else repr(sender.error)
        Path(result_path).write_text(json.dumps(result))


def _run_child(tmp_path: Path, flag: str) -> dict[str, Any]:
    """Run this file with ``flag`` in a fresh process that finds NDI senders on 127.0.0.1.

    Discovery on loopback needs an NDI config naming 127.0.0.1, read when the NDI library
    initialises: a fresh process with NDI_CONFIG_DIR set is the safe way.
    """
    config = tmp_path / "ndi"
    config.mkdir()
    (config / "ndi-config.v1.json").write_text(
        json.dumps({"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}}))
    result_path = tmp_path / "result.json"
    env = {**os.environ, "NDI_CONFIG_DIR": str(config), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, flag, str(result_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result_path.exists(), f"child failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(result_path.read_text())
    assert proc.returncode == 0, f"child failed: {result}\n{proc.stderr}"
    return result


NEEDS_NDI = pytest.mark.skipif(ndi.unavailable_reason() is not None,
                               reason=f"cyndilib cannot be imported: {ndi.unavailable_reason()}")


@NEEDS_NDI
def test_ndi_loopback(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "--loopback")
    print(f"\nNDI loopback: {json.dumps(result, indent=1)}")
    assert result["sender_error"] is None
    assert result["found_as"].endswith(f"({result['name']})")
    assert "not found" in result["not_found_error"]
    assert result["found_as"] in result["not_found_error"]  # lists the sources it saw
    assert result["first_size"] == [128, 72]
    red, green, blue = result["first_rgb"]
    assert red > 230 and green < 25 and blue < 25, f"pure red arrived as {result['first_rgb']}"
    assert result["first_alpha"] == 255
    assert result["frames"] >= 10
    assert len(result["patterns_seen"]) >= 3
    assert result["max_error"] <= MAX_PIXEL_ERROR, result["max_error_by_pattern"]
    assert result["mean_error"] <= MEAN_PIXEL_ERROR
    assert result["fps_512"] > 0
    assert result["lost_error"] is not None and "disconnected" in result["lost_error"]


# --- real loopback: audio ---------------------------------------------------------------------

TONE_HZ = 440.0
TONE_AMPLITUDE = 0.5
AUDIO_RATE = 48000
AUDIO_BLOCK = 1024  # samples per NDI audio frame sent (about 21 ms)


class _AudioSender(threading.Thread):
    """An NDI sender of a stereo sine, paced in real time, from its own thread (cyndilib only)."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name_ = name
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cyndilib = ndi.load_cyndilib()
            frame = cyndilib.AudioSendFrame(max_num_samples=AUDIO_BLOCK)
            frame.sample_rate = AUDIO_RATE
            frame.num_channels = 2
            sender = cyndilib.Sender(self.name_, clock_video=False, clock_audio=False)
            sender.set_audio_frame(frame)
            sender.open()
            try:
                start = time.perf_counter()
                while not self.stop.is_set():
                    t = (self.sent * AUDIO_BLOCK + np.arange(AUDIO_BLOCK)) / AUDIO_RATE
                    tone = TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)
                    sender.write_audio(np.repeat(tone[None, :], 2, axis=0).astype(np.float32))
                    self.sent += 1
                    delay = start + self.sent * AUDIO_BLOCK / AUDIO_RATE - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
            finally:
                sender.close()
        except (RuntimeError, ValueError, OSError) as exc:  # reported through the JSON result
            self.error = exc


def _audio_loopback_child(result_path: str) -> None:
    """Runs in a fresh process whose NDI_CONFIG_DIR points discovery at 127.0.0.1."""
    from engine.control.state import ControlState
    from engine.modulation.follower import AudioFollower, Band
    from engine.runtime.music import Music, MusicSettings
    from tests.fakes import wait_until

    name = f"latentstage-audio-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    result: dict[str, Any] = {"name": name}
    sender = _AudioSender(name)
    sender.start()
    try:
        source = ndi.NdiAudioSource(name, find_timeout=10, lost_after=1.0)
        result["found_as"] = source.name
        result["format"] = [source.sample_rate, source.channels]

        # One second of the tone, as the engine's feed reads it (blocks of a tenth of a second);
        # the frame sync hands out silence until the first audio has arrived.
        follower = AudioFollower(source.sample_rate)
        tone_frames, blocks, bad_blocks = 0, 0, []
        deadline = time.monotonic() + 10.0
        while tone_frames < source.sample_rate and time.monotonic() < deadline:
            block = source.read(4800)
            if not len(block):
                time.sleep(0.01)
                continue
            blocks += 1
            if block.dtype != np.float32 or block.ndim != 2 or block.shape[1] != 2 or len(block) > 4800:
                bad_blocks.append([str(block.dtype), list(block.shape)])
            follower.process(block)
            if np.abs(block).max() > 0.1:
                tone_frames += len(block)
        result["tone_frames"] = tone_frames
        result["blocks"] = blocks
        result["bad_blocks"] = bad_blocks
        result["levels"] = {band.value: follower.instant(band) for band in Band}
        result["smoothed_rms"] = follower.smoothed(Band.RMS)

        time.sleep(0.3)  # about 14400 frames are due: a read of 100 gets the newest 100
        result["newest_of_many"] = len(source.read(100))

        # The engine's path: audio.ndi opened by Music, its feed thread driving the follower.
        music = Music(MusicSettings(audio_ndi=name), ControlState(), lambda: 0.0)
        music.start()
        try:
            assert music.follower is not None, "Music did not open audio.ndi"
            result["music_follows"] = wait_until(lambda: music.follower.instant(Band.MID) > 0.25)
            result["music_mid"] = music.follower.instant(Band.MID)

            # The sender goes away: the source reports it lost; the feed holds the levels at 0.
            sender.stop.set()
            sender.join(5)
            result["lost_error"] = None
            until = time.monotonic() + 8.0
            while time.monotonic() < until and result["lost_error"] is None:
                try:
                    source.read(4800)
                    time.sleep(0.01)
                except BridgeError as exc:
                    result["lost_error"] = str(exc)
            result["music_silent_after_loss"] = wait_until(
                lambda: music.follower.instant(Band.RMS) == 0.0)
        finally:
            music.close()
        source.close()
        source.close()  # twice is fine
        try:
            source.read(10)
            result["closed_error"] = None
        except BridgeError as exc:
            result["closed_error"] = str(exc)
    finally:
        sender.stop.set()
        sender.join(5)
        result["sender_error"] = None if sender.error is None else repr(sender.error)
        result["sent_blocks"] = sender.sent
        Path(result_path).write_text(json.dumps(result))


@NEEDS_NDI
def test_ndi_audio_loopback_drives_the_audio_follower(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "--audio-loopback")
    print(f"\nNDI audio loopback: {json.dumps(result, indent=1)}")
    assert result["sender_error"] is None
    assert result["found_as"].endswith(f"({result['name']})")
    assert result["format"] == [48000, 2]
    assert result["tone_frames"] >= 48000, "less than a second of the tone arrived within 10 s"
    assert result["bad_blocks"] == []
    levels = result["levels"]
    # A sine of amplitude 0.5 has an RMS of 0.5 / sqrt(2) = 0.354; 440 Hz lies in mid (150-2000 Hz).
    assert 0.25 <= levels["rms"] <= 0.45, levels
    assert 0.25 <= levels["mid"] <= 0.45, levels
    assert levels["low"] < 0.05 and levels["high"] < 0.05, levels
    assert result["newest_of_many"] == 100
    assert result["music_follows"], result["music_mid"]
    assert result["lost_error"] is not None and "disconnected" in result["lost_error"]
    assert result["music_silent_after_loss"]
    assert result["closed_error"] is not None and "closed" in result["closed_error"]


if __name__ == "__main__" and sys.argv[1:2] in (["--loopback"], ["--audio-loopback"]):
    logging_level = os.environ.get("LATENTSTAGE_TEST_LOG")
    if logging_level:
        import logging

        logging.basicConfig(level=logging_level)
    if sys.argv[1] == "--loopback":
        _loopback_child(sys.argv[2])
    else:
        _audio_loopback_child(sys.argv[2])
