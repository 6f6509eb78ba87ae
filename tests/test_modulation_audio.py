"""Audio sources (WAV at real-time pace on a fake clock, looping; the optional extras) and the
audio follower on synthetic tones (bands, RMS, attack / release time constants)."""

from __future__ import annotations

import math
import sys
import wave

import numpy as np
import pytest

from bridges.base import BridgeUnavailable, SourceClosed
from engine.modulation.audio import AudioSource, DeviceSource, WavSource, open_audio_file
from engine.modulation.follower import AudioFollower, Band

RATE = 48000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_wav(path, samples: np.ndarray, width: int = 2, rate: int = RATE) -> None:
    """``(frames, channels)`` floats in [-1, 1) as signed PCM of ``width`` bytes."""
    scale = float(1 << (8 * width - 1))
    ints = np.clip(np.round(samples * scale), -scale, scale - 1).astype(np.int64)
    if width == 3:
        raw = (ints & 0xFFFFFF).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = ints.astype("<i2" if width == 2 else "<i4").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)


def ramp(frames: int, channels: int) -> np.ndarray:
    """A signal whose every sample is distinct, so a round trip shows each frame's place."""
    base = np.linspace(-0.9, 0.9, frames, endpoint=False)
    return np.stack([base * (1 - 0.5 * c) for c in range(channels)], axis=1)


def sine(freq: float, seconds: float, amplitude: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_round_trip_at_real_time_pace(tmp_path, width, channels):
    signal = ramp(4800, channels)
    write_wav(tmp_path / "a.wav", signal, width)
    clock = FakeClock()
    with WavSource(tmp_path / "a.wav", clock=clock) as source:
        assert isinstance(source, AudioSource)
        assert (source.sample_rate, source.channels, source.frames) == (RATE, channels, 4800)
        assert source.read(10000).shape == (0, channels)  # the first read starts the clock
        clock.now += 0.01  # 10 ms: 480 frames due
        first = source.read(10000)
        assert first.dtype == np.float32 and first.shape == (480, channels)
        clock.now += 0.09
        rest = source.read(10000)
        assert rest.shape == (4320, channels)
        got = np.concatenate([first, rest])
        assert np.max(np.abs(got - signal)) <= 1.0 / (1 << (8 * width - 1)) + 1e-7
        clock.now += 0.01
        with pytest.raises(SourceClosed, match="reached its end"):
            source.read(10000)


def test_wav_loops_for_installations(tmp_path):
    signal = ramp(1000, 1)
    write_wav(tmp_path / "loop.wav", signal, 2, rate=10000)
    clock = FakeClock()
    source = WavSource(tmp_path / "loop.wav", loop=True, clock=clock)
    source.read(1)
    got = []
    for _ in range(25):  # 2.5 passes in reads of 100 frames
        clock.now += 0.01
        got.append(source.read(1000))
    joined = np.concatenate(got)[:, 0]
    expected = np.tile(signal[:, 0], 3)[:2500]
    assert joined.shape == (2500,)
    assert np.max(np.abs(joined - expected)) < 1e-4
    source.close()
    source.close()  # safe twice


def test_a_reader_that_falls_behind_gets_the_newest_audio(tmp_path):
    signal = ramp(10000, 1)
    write_wav(tmp_path / "a.wav", signal, 2, rate=10000)
    clock = FakeClock()
    with WavSource(tmp_path / "a.wav", loop=True, clock=clock) as source:
        source.read(1)
        clock.now += 0.5  # 5000 frames due, only 256 wanted: the last 256 of them
        got = source.read(256)[:, 0]
        assert np.max(np.abs(got - signal[4744:5000, 0])) < 1e-4
        clock.now += 0.7  # 7000 more: wraps past the end
        got = source.read(100)[:, 0]
        assert np.max(np.abs(got - signal[1900:2000, 0])) < 1e-4


def test_bad_wav_files_name_the_file_and_what_is_allowed(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match=r"junk.wav.*allowed: a PCM WAV file of 16, 24 or 32-bit"):
        WavSource(tmp_path / "junk.wav")
    write_wav(tmp_path / "eight.wav", ramp(10, 1), 2)
    with wave.open(str(tmp_path / "eight.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(RATE)
        out.writeframes(bytes(10))
    with pytest.raises(ValueError, match="8-bit, 1 channels; allowed: a PCM WAV"):
        WavSource(tmp_path / "eight.wav")
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 2)
    with pytest.raises(ValueError, match="holds no audio"):
        WavSource(tmp_path / "empty.wav")


def test_flac_without_soundfile_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(BridgeUnavailable, match=r"pip install latentstage\[audio\]"):
        open_audio_file(tmp_path / "a.flac")


def test_wav_opens_without_soundfile(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    write_wav(tmp_path / "a.wav", ramp(10, 1), 2)
    with open_audio_file(tmp_path / "a.wav") as source:
        assert isinstance(source, WavSource)


def test_flac_round_trip_with_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    signal = ramp(2000, 2)
    soundfile.write(str(tmp_path / "a.flac"), signal, 10000, subtype="PCM_16")
    clock = FakeClock()
    with open_audio_file(tmp_path / "a.flac", clock=clock) as source:
        source.read(1)
        clock.now += 0.2
        got = source.read(5000)
    assert got.shape == (2000, 2)
    assert np.max(np.abs(got - signal)) < 1e-4


def test_audio_input_without_sounddevice_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(BridgeUnavailable, match=r"Audio input.*pip install latentstage\[audio\]"):
        DeviceSource()


@pytest.mark.sdk
def test_audio_input_device_reads_blocks():
    pytest.importorskip("sounddevice")
    try:
        source = DeviceSource(buffer_seconds=0.5)
    except BridgeUnavailable as exc:  # no PortAudio library here
        pytest.skip(str(exc))
    except OSError as exc:  # PortAudio without an input device (sounddevice.PortAudioError)
        pytest.skip(f"no audio input device: {exc}")
    with source:
        block = source.read(4096)
        assert block.dtype == np.float32 and block.ndim == 2 and block.shape[1] == 1


def follow(follower: AudioFollower, signal: np.ndarray) -> list[dict[Band, float]]:
    """Feed ``signal`` one hop at a time; the smoothed levels after each hop."""
    trace = []
    for start in range(0, len(signal), follower.hop):
        follower.process(signal[start : start + follower.hop])
        trace.append({band: follower.smoothed(band) for band in Band})
    return trace


def test_a_60_hz_sine_drives_low_and_not_high():
    follower = AudioFollower(RATE, attack=0.0, release=0.0)
    follower.process(sine(60.0, 0.5)[:, None])
    assert follower.level(Band.LOW) == pytest.approx(0.707, abs=0.03)
    assert follower.level(Band.MID) < 0.02
    assert follower.level(Band.HIGH) < 0.001


def test_a_5_khz_sine_drives_high_and_not_low():
    follower = AudioFollower(RATE, attack=0.0, release=0.0)
    follower.process(np.stack([sine(5000.0, 0.5)] * 2, axis=1))  # stereo, mixed to mono
    assert follower.level(Band.HIGH) == pytest.approx(0.707, abs=0.01)
    assert follower.level(Band.LOW) < 0.001
    assert follower.level(Band.MID) < 0.01


def test_a_1_khz_sine_drives_mid():
    follower = AudioFollower(RATE, attack=0.0, release=0.0)
    follower.process(sine(1000.0, 0.5))
    assert follower.level(Band.MID) == pytest.approx(0.707, abs=0.01)
    assert max(follower.level(Band.LOW), follower.level(Band.HIGH)) < 0.01


def test_rms_of_a_full_scale_sine_and_the_gain():
    follower = AudioFollower(RATE, attack=0.0, release=0.0, gain=1.0)
    follower.process(sine(1000.0, 0.5))
    assert follower.instant(Band.RMS) == pytest.approx(1 / math.sqrt(2), abs=0.005)
    assert follower.level(Band.RMS) == pytest.approx(1 / math.sqrt(2), abs=0.005)
    louder = AudioFollower(RATE, attack=0.0, release=0.0, gain=1.2)
    louder.process(sine(1000.0, 0.5, amplitude=0.5))
    assert louder.level(Band.RMS) == pytest.approx(1.2 * 0.5 / math.sqrt(2), abs=0.005)
    clipped = AudioFollower(RATE, attack=0.0, release=0.0, gain=4.0)
    clipped.process(sine(1000.0, 0.5))
    assert clipped.level(Band.RMS) == 1.0
    silent = AudioFollower(RATE)
    silent.process(np.zeros(RATE // 10, dtype=np.float32))
    assert all(silent.level(band) == 0.0 for band in Band)


def time_constant(times: list[float], values: list[float], final: float) -> float:
    """The one-pole time constant from the log-slope of the distance to ``final``."""
    distances = [abs(final - v) for v in values]
    return -(times[-1] - times[0]) / math.log(distances[-1] / distances[0])


def test_attack_and_release_time_constants_within_10_percent():
    attack, release = 0.2, 0.5
    follower = AudioFollower(RATE, attack=attack, release=release)
    signal = np.concatenate([sine(1000.0, 1.5), np.zeros(int(2.5 * RATE), dtype=np.float32)])
    trace = [levels[Band.RMS] for levels in follow(follower, signal)]
    hop_s = follower.hop / RATE
    times = [(i + 1) * hop_s for i in range(len(trace))]
    final = 1 / math.sqrt(2)
    window_s = follower.window / RATE
    # rise: once the window holds only the tone, the distance to the final level shrinks by e per attack
    rise = [(t, v) for t, v in zip(times, trace) if window_s + 0.01 <= t <= 0.6]
    measured = time_constant([t for t, _ in rise], [v for _, v in rise], final)
    assert measured == pytest.approx(attack, rel=0.1)
    # and the plain reading: 63.2 % of the step within 10 % of the attack time
    reached = next(t for t, v in zip(times, trace) if v >= (1 - math.exp(-1)) * final)
    assert reached == pytest.approx(attack, rel=0.1)
    # fall: after the tone leaves the window the level decays by e per release
    fall = [(t, v) for t, v in zip(times, trace) if 1.5 + window_s + 0.01 <= t <= 3.0]
    measured = time_constant([t for t, _ in fall], [v for _, v in fall], 0.0)
    assert measured == pytest.approx(release, rel=0.1)


def test_block_sizes_do_not_change_the_analysis():
    signal = np.concatenate([sine(60.0, 0.3), sine(3000.0, 0.3, 0.3)])
    by_hop, odd = AudioFollower(RATE), AudioFollower(RATE)
    follow(by_hop, signal)
    for start in range(0, len(signal), 777):
        odd.process(signal[start : start + 777])
    assert [odd.smoothed(b) for b in Band] == pytest.approx([by_hop.smoothed(b) for b in Band], rel=1e-6)


def test_the_follower_reads_a_wav_source(tmp_path):
    write_wav(tmp_path / "kick.wav", sine(60.0, 0.5)[:, None], 2)
    clock = FakeClock()
    follower = AudioFollower(RATE, attack=0.0, release=0.0)
    with WavSource(tmp_path / "kick.wav", clock=clock) as source:
        source.read(1)
        for _ in range(20):
            clock.now += 0.02
            follower.process(source.read(4096))
    assert follower.level(Band.LOW) == pytest.approx(0.707, abs=0.03)
    assert follower.level(Band.HIGH) < 0.001


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attack": -0.1}, "attack -0.1"),
        ({"release": float("nan")}, "release nan"),
        ({"gain": -1.0}, "gain -1.0"),
        ({"sample_rate": 100}, "sample rate 100"),
        ({"hop": 4096}, "hop 4096"),
    ],
)
def test_bad_follower_settings_name_the_value(kwargs, named):
    settings = {"sample_rate": RATE, **kwargs}
    with pytest.raises(ValueError, match="allowed: ") as caught:
        AudioFollower(**settings)
    assert named in str(caught.value)
