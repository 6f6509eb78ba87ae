"""Musical time wired into the engine: tempo over OSC, quantised changes, modulators, sequences.

A fake clock drives everything but the engine tests at the end and the audio feed's thread: no sleeps,
exact times.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pythonosc.osc_message_builder import OscMessageBuilder

from bridges.base import BridgeError
from engine import params
from engine.control.dispatch import OscDispatcher
from engine.control.oscquery import build_namespace
from engine.control.scenes import SceneStore
from engine.control.service import ControlService, ControlSettings
from engine.control.state import ControlState
from engine.modulation.follower import AudioFollower, Band
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.engine import Engine, EngineOptions
from engine.runtime.music import AudioFeed, Music, MusicSettings
from engine.stream.modes import CfgType
from engine.tempo.kinds import TempoSource
from tests.fakes import SIZE, FakeSource, RecordingSink, wait_until

SENDER = ("127.0.0.1", 50000)
LEAD_S = 0.2  # the change-to-screen latency the fake engine "measured"


class Clock:
    """``time.monotonic`` stand-in: set ``t`` by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def msg(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


class Rig:
    """Music + ControlState + the control service's dispatcher on one fake clock (no sockets used)."""

    def __init__(
        self, tmp_path: Path, source: TempoSource = TempoSource.INTERNAL, lead: float = LEAD_S
    ) -> None:
        self.clock = Clock()
        self.state = ControlState()
        self.music = Music(MusicSettings(source=source, bpm=120.0), self.state, lambda: lead, now=self.clock)
        self.service = ControlService(
            ControlSettings(port=0, feedback=[], oscquery_port=None, scenes_dir=str(tmp_path / "scenes")),
            self.state,
            lambda values, crossfade, due=None: self.state.write(values, crossfade, due=due),
            dict,
            music=self.music,
            now=self.clock,
        )
        self.dispatcher: OscDispatcher = self.service.dispatcher

    def send(self, address: str, *args: Any) -> list[str]:
        """Feed one datagram; the errors it was answered with."""
        replies = self.dispatcher.handle_datagram(msg(address, *args), SENDER)
        return [str(r.args[0]) for r in replies if r.address == "/engine/error"]

    def commit(self, now: float | None = None, interval: float = 0.1) -> dict[str, Any]:
        """What the frame loop takes at a frame boundary (``Engine._apply_pending``'s rule) and
        applies to the music, as the engine does."""
        now = self.clock.t if now is None else now
        held = self.state.take_to_warm()
        while held is not None:  # the prompt worker caches a held change's prompts meanwhile
            self.state.warmed(held)
            held = self.state.take_to_warm()
        pending = self.state.take_pending(now + interval / 2)
        if pending is None:
            return {}
        runtime = {k: v for k, v in pending.changes.items() if k in params.RUNTIME_PARAMS}
        self.music.apply(runtime, now)
        self.state.mark_applied(pending.changes)
        return pending.changes

    def close(self) -> None:
        self.service.close()


@pytest.fixture
def rig(tmp_path):
    made = Rig(tmp_path)
    yield made
    made.close()


# ----------------------------------------------------------------------------- tempo over OSC


def test_four_taps_at_100_bpm_set_the_tempo_and_put_the_beat_on_the_taps(rig):
    for i in range(4):
        rig.clock.t = 10.0 + 0.6 * i
        assert rig.send("/tempo/tap") == []
    assert rig.music.clock.bpm == pytest.approx(100.0)
    assert rig.commit() == {"bpm": pytest.approx(100.0)}  # echoed, autosaved like any value
    assert rig.music.clock.phase(11.8) == pytest.approx(0.0, abs=1e-9)  # the last tap is a beat


def test_a_button_release_does_not_tap_and_a_bad_tap_is_refused(rig):
    rig.clock.t = 1.0
    rig.send("/tempo/tap", 1)
    rig.clock.t = 1.5
    assert rig.send("/tempo/tap", 0) == []  # the release of a button: nothing happens
    assert rig.music.taps.estimate is None
    assert "allowed" in rig.send("/tempo/tap", "x")[0]


def test_a_midi_clock_owns_the_tempo_so_bpm_and_taps_are_refused(tmp_path):
    rig = Rig(tmp_path, TempoSource.MIDI_CLOCK)
    try:
        for address, args in (("/tempo/bpm", (128.0,)), ("/tempo/tap", ()), ("/tempo/resync", ())):
            errors = rig.send(address, *args)
            assert errors and "tempo.source midi_clock" in errors[0] and "allowed" in errors[0]
        assert rig.commit() == {}
    finally:
        rig.close()


def test_resolume_tempo_is_followed_only_with_tempo_source_osc(rig, tmp_path):
    errors = rig.send("/composition/tempocontroller/tempo", 0.5)
    assert errors and "tempo.source osc" in errors[0]
    follower = Rig(tmp_path, TempoSource.OSC)
    try:
        assert follower.send("/composition/tempocontroller/tempo", 0.5) == []
        assert follower.commit() == {"bpm": pytest.approx(260.0)}  # 20 + 0.5 x (500 - 20)
        assert follower.music.clock.bpm == pytest.approx(260.0)
        assert "[0, 1]" in follower.send("/composition/tempocontroller/tempo", 1.5)[0]
        follower.clock.t = 3.3
        assert follower.send("/composition/tempocontroller/resync", 1) == []
        assert follower.music.clock.beat(3.3) == pytest.approx(0.0)
    finally:
        follower.close()


# ----------------------------------------------------------------------------- quantised changes


def test_quantize_bar_then_a_scene_load_is_committed_so_it_is_seen_on_the_next_bar(rig, tmp_path):
    SceneStore(tmp_path / "scenes").save("drop", {"guidance_scale": 3.0, "prompt": "a red circle"})
    assert rig.send("/quantize/offset_ms", 50.0) == []
    assert rig.send("/quantize", "bar") == []  # not applied yet: the load right after still sees it
    rig.clock.t = 0.9
    assert rig.send("/preset/load", "drop") == []
    assert rig.commit() == {"quantize": "bar", "quantize_offset_ms": 50.0}
    # 120 BPM, 4/4: the bar is at 2.0 s; committed latency (0.2) + offset (0.05) before it
    (held,) = rig.state.held()
    assert held.due == pytest.approx(1.75)
    frames = [round(0.1 * i, 1) for i in range(10, 25)]  # frame boundaries every 100 ms
    taken = {}
    for t in frames:
        rig.clock.t = t
        changes = rig.commit()
        if changes:
            taken[t] = changes
    # the boundary nearest the due time (1.7 + half a frame >= 1.75): seen at 1.7 + 0.2 + 0.05
    assert list(taken) == [1.7]
    assert taken[1.7]["guidance_scale"] == 3.0


def test_a_scene_with_its_own_quantum_and_a_q_prefixed_change(rig, tmp_path):
    store = SceneStore(tmp_path / "scenes")
    store.save("intro", {"delta": 0.5})
    path = store.path("intro")
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "quantize": "4bars"}))
    rig.clock.t = 0.5
    assert rig.send("/preset/load", "intro") == []  # global quantize is off; the scene says 4bars
    assert [h.due for h in rig.state.held()] == [pytest.approx(8.0 - LEAD_S)]
    assert rig.send("/q/beat/guidance_scale", 2.5) == []
    assert rig.state.held()[0].due == pytest.approx(1.0 - LEAD_S)  # the next beat after 0.5 + 0.2
    assert rig.send("/q/guidance_scale", 2.0) == []  # the global quantum: off, so at once
    assert rig.commit() == {"guidance_scale": 2.0}
    errors = rig.send("/q/bar/tempo/tap")
    assert errors and "does not apply" in errors[0] and "allowed" in errors[0]
    path.write_text(yaml.safe_dump({**data, "quantize": "3bars"}))
    assert "quantize '3bars'" in rig.send("/preset/load", "intro")[0]


# ----------------------------------------------------------------------------- modulators


def test_modulators_over_osc_edits_coalesce_and_bad_ones_name_what_is_allowed(rig):
    assert rig.send("/modulators", "[{target: guidance_scale, shape: sine, depth: 0.3}]") == []
    assert rig.send("/mod/depth", 0, 0.5) == []
    assert rig.send("/mod/rate", 0, "2beats") == []  # two edits before a frame: both count
    assert rig.send("/mod/add", "{kind: envelope, name: hit, target: delta, attack: 0, decay: 0.5}") == []
    changes = rig.commit()
    assert changes["modulators"] == [
        {"target": "guidance_scale", "rate": "2beats", "depth": 0.5},
        {"target": "delta", "kind": "envelope", "name": "hit", "attack": 0.0, "decay": 0.5},
    ]
    assert rig.music.targets == {"guidance_scale", "delta"}
    assert "allowed: an index 0..1 or a name (hit)" in rig.send("/mod/depth", 5, 1.0)[0]
    assert "allowed" in rig.send("/mod/rate", 0, "3 parsecs")[0]
    assert "not an envelope; allowed: hit" in rig.send("/mod/trigger", 0)[0]
    bad = rig.send("/modulators", "[{target: bpm}]")[0]
    assert "modulators[0].target" in bad and "allowed: guidance_scale" in bad
    assert "allowed" in rig.send("/modulators", "[{target: delta")[0]  # broken YAML
    assert rig.send("/mod/remove", "hit") == []
    assert rig.commit()["modulators"] == [{"target": "guidance_scale", "rate": "2beats", "depth": 0.5}]


def test_an_lfo_of_one_bar_peaks_for_the_moment_its_frame_is_seen_and_is_clamped(rig):
    rig.send("/modulators", "[{target: guidance_scale, shape: sine, rate: 1bar, depth: 0.3}]")
    rig.commit()
    base = {"guidance_scale": 2.0}
    # seen at t + 0.2: t = 0.3 is seen at 0.5 s = beat 1 = a quarter of the bar, the sine's top
    assert rig.music.frame(0.3, base)["guidance_scale"] == pytest.approx(2.3)
    assert rig.music.frame(1.3, base)["guidance_scale"] == pytest.approx(1.7)
    samples = [rig.music.frame(0.05 * i, base)["guidance_scale"] for i in range(200)]
    rising = [i for i in range(1, 200) if samples[i - 1] < 2.0 <= samples[i]]
    assert [0.05 * (b - a) for a, b in itertools.pairwise(rising)] == [pytest.approx(2.0)] * 4
    assert rig.music.frame(0.3, {"guidance_scale": 19.9})["guidance_scale"] == 20.0  # the registry's max


def test_an_envelope_fired_over_osc_rises_and_decays_on_the_frame_loop(rig):
    rig.send("/modulators", "[{kind: envelope, name: hit, target: delta, attack: 0, decay: 0.4, sustain: 0}]")
    rig.commit()
    base = {"delta": 1.0}
    assert rig.music.frame(0.0, base)["delta"] == 1.0
    rig.clock.t = 1.0
    assert rig.send("/mod/trigger", "hit") == []
    # queued on the OSC thread, fired by the frame loop at the time it arrived
    levels = [rig.music.frame(1.0 + 0.1 * i - LEAD_S, base)["delta"] for i in range(6)]
    assert levels[0] == pytest.approx(1.1, abs=1e-6)  # attack 0: full level (depth 0.1) at once
    assert all(a > b for a, b in itertools.pairwise(levels[:4])) and levels[4] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- prompt sequences


def test_a_sequence_steps_on_the_bar_committed_ahead_by_the_latency(rig):
    assert (
        rig.send("/sequence", "{steps: [a cat, [[a dog, 1], [a fox, 0.5]]], every: 1bar, crossfade: 1}") == []
    )
    rig.commit()
    assert rig.send("/sequence/start") == []
    rig.music.frame(0.0, {})
    (first,) = rig.state.held()
    assert first.changes == {"prompt": "a cat"} and first.due == pytest.approx(0.0)
    assert first.crossfade_s == pytest.approx(0.5)  # one beat at 120 BPM
    committed = {}
    for i in range(1, 45):
        rig.clock.t = 0.1 * i
        rig.music.frame(rig.clock.t, {})
        changes = rig.commit()
        if changes:
            committed[round(rig.clock.t, 1)] = changes
    # each step is seen on its bar (2 s, 4 s): committed at the frame nearest bar - 0.2 s
    assert committed == {
        0.1: {"prompt": "a cat"},
        1.8: {"prompt_blend": [("a dog", 1.0), ("a fox", 0.5)]},
        3.8: {"prompt": "a cat"},
    }
    assert rig.music.status().sequence_step == 0
    assert rig.send("/sequence/jump", 7)[0].endswith("allowed: 0..1")
    assert rig.send("/sequence/stop") == []
    rig.music.frame(4.5, {})
    assert rig.state.held() == []


def test_a_bad_sequence_is_refused_naming_the_field(rig):
    errors = rig.send("/sequence", "{steps: [a cat], every: 2hz}")
    assert errors and "every" in errors[0] and "allowed" in errors[0]
    assert "no sequence is set" in rig.send("/sequence/start")[0]


# ----------------------------------------------------------------------------- the registry drives it


def test_the_new_addresses_are_in_oscquery_and_the_docs():
    root = build_namespace({"bpm": 120.0, "quantize": "bar"}, {"bpm": 120.0}, "127.0.0.1", 9000)
    quantize = root["CONTENTS"]["quantize"]
    assert quantize["TYPE"] == "s" and quantize["VALUE"] == ["bar"] and "offset_ms" in quantize["CONTENTS"]
    mod = root["CONTENTS"]["engine"]["CONTENTS"]["mod"]["CONTENTS"]
    assert {"guidance_scale", "delta", "controlnet_scales", "prompt_blend"} <= set(mod)
    assert root["CONTENTS"]["engine"]["CONTENTS"]["beat"]["TYPE"] == "i"
    docs = (Path(__file__).parents[1] / "docs" / "osc.md").read_text(encoding="utf-8")
    for address in ("/tempo/tap", "/quantize", "/modulators", "/sequence/jump", "/engine/mod/guidance_scale"):
        assert f"`{address}`" in docs


# ----------------------------------------------------------------------------- the engine


def _pipeline(bundle) -> StreamPipeline:
    settings = PipelineSettings(
        width=SIZE, height=SIZE, t_index_list=[32], cfg_type=CfgType.NONE, prompt="test", guidance_scale=2.0
    )
    return StreamPipeline(bundle, settings)


def test_modulated_values_play_but_never_reach_echoes_scenes_or_the_autosave(bundle, tmp_path):
    modulators = [{"target": "guidance_scale", "shape": "square", "rate": "8hz", "depth": 1.5}]
    sink = RecordingSink()
    echoed: list[dict[str, Any]] = []
    options = EngineOptions(runtime_values={"modulators": modulators})
    engine = Engine(_pipeline(bundle), lambda: FakeSource(fps=30), [("rec", lambda: sink)], options)
    engine.on_applied = echoed.append
    played = []
    engine.pipeline.commit = _spy(engine.pipeline.commit, played)
    with engine:
        engine.run(max_frames=12)
        engine.submit({"delta": 0.7})  # a base change while modulated
        engine.run(max_frames=24)
    assert {round(state["guidance_scale"], 3) for state in played} >= {3.5}  # it played modulated
    applied = engine.control.applied()
    assert applied["guidance_scale"] == 2.0 and applied["modulators"] == modulators
    assert all(e.get("guidance_scale", 2.0) == 2.0 for e in echoed) and {"delta": 0.7} in echoed
    SceneStore(tmp_path).save("look", applied)
    assert yaml.safe_load((tmp_path / "look.yaml").read_text())["values"]["guidance_scale"] == 2.0
    assert engine.status()["bpm"] == 120.0


def test_removing_the_modulators_puts_the_base_back(bundle):
    modulators = [{"target": "delta", "shape": "square", "rate": "8hz", "depth": 0.5}]
    engine = Engine(
        _pipeline(bundle),
        lambda: FakeSource(fps=30),
        [("rec", RecordingSink)],
        EngineOptions(runtime_values={"modulators": modulators}),
    )
    with engine:
        engine.run(max_frames=6)
        assert engine.pipeline.state["delta"] != 1.0
        engine.submit({"modulators": []})
        engine.run(max_frames=10)
    assert engine.pipeline.state["delta"] == 1.0 and engine.control.applied()["delta"] == 1.0


def _spy(commit, played: list[dict[str, Any]]):
    def wrapper(plan, *args, **kwargs):
        played.append(dict(plan.state))
        return commit(plan, *args, **kwargs)

    return wrapper


def test_status_and_periods_are_finite(rig):
    status = rig.music.status()
    assert math.isfinite(status.bpm) and status.sequence_step == -1
    assert status.next_beat(0.1) == pytest.approx(0.5)


def test_a_held_prompt_whose_encoding_is_not_done_waits_for_the_encoder():
    state = ControlState()
    state.write({"prompt": "a cat", "delta": 0.5}, 1.0, due=2.0, tag="t")
    assert state.take_pending(1.9) is None and state.latest("prompt") is None  # not yet: not "latest"
    assert state.take_pending(2.0) is None  # due, but its prompt is not cached: to the encoder
    assert state.take_for_encoding(0.0) == ({"prompt": "a cat", "delta": 0.5}, 1.0)
    state.write({"delta": 0.1}, due=5.0, tag="t")
    assert state.cancel("t") == 1 and state.held() == []


def test_edits_of_one_value_between_two_frames_both_count():
    state = ControlState({"modulators": []})
    state.edit("modulators", lambda current: [*current, {"target": "delta"}])
    state.edit("modulators", lambda current: [*current, {"target": "guidance_scale"}])
    assert state.take_pending().changes == {"modulators": [{"target": "delta"}, {"target": "guidance_scale"}]}


def test_switching_a_modulator_off_releasing_an_envelope_and_resolumes_tap(tmp_path):
    rig = Rig(tmp_path, TempoSource.OSC)
    try:
        rig.send(
            "/modulators",
            "[{kind: envelope, name: pad, target: delta, attack: 0, decay: 0, sustain: 1, release: 1}]",
        )
        rig.commit()
        rig.clock.t = 1.0
        assert rig.send("/mod/trigger", "pad") == []
        assert rig.music.frame(1.0, {"delta": 1.0})["delta"] == pytest.approx(1.1)  # held at sustain
        assert rig.send("/mod/release", 0) == []
        assert rig.music.frame(3.0, {"delta": 1.0})["delta"] < 1.1
        assert rig.send("/mod/enabled", "pad", 0) == []
        rig.commit()
        assert rig.music.targets == frozenset() and rig.music.frame(3.1, {"delta": 1.0}) == {}
        for i in range(3):
            rig.clock.t = 5.0 + 0.5 * i
            assert rig.send("/composition/tempocontroller/tempotap", 1) == []
        assert rig.music.clock.bpm == pytest.approx(120.0)
    finally:
        rig.close()


def test_a_missing_tempo_extra_or_audio_file_stops_the_start_with_one_line(tmp_path):
    from engine.config import load_config
    from engine.preflight import check_start

    config = load_config(
        overrides=["tempo.source=link", f"audio.file={tmp_path / 'gone.wav'}", "osc.enabled=false"]
    )
    problems = {p.key: str(p) for p in check_start(config)}
    assert "latentstage[link]" in problems["tempo.source"] and "gone.wav" in problems["audio.file"]


def test_audio_ndi_without_cyndilib_stops_the_start_with_one_line(monkeypatch):
    from engine.config import load_config
    from engine.preflight import check_start

    monkeypatch.setitem(sys.modules, "cyndilib", None)
    config = load_config(overrides=["audio.ndi=STAGE-PC (Ableton)", "osc.enabled=false"])
    problems = {p.key: str(p) for p in check_start(config)}
    assert problems["audio.ndi"] == "audio.ndi: cyndilib is not installed; pip install latentstage[ndi]"


class _LosableTone:
    """An audio source of a 440 Hz sine (amplitude 0.5) that raises ``BridgeError`` while lost."""

    sample_rate = 48000
    channels = 1

    def __init__(self) -> None:
        self.lost = False
        self._frames = 0

    def read(self, max_frames: int) -> np.ndarray:
        if self.lost:
            raise BridgeError("NDI source 'HOST (X)' disconnected (no connection for 3.0 s)")
        t = (self._frames + np.arange(480)) / self.sample_rate
        self._frames += 480
        return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[-max_frames:, None]

    def close(self) -> None:
        pass


def test_the_audio_feed_holds_0_while_its_source_is_lost_and_follows_it_when_back(caplog):
    source, follower, stop = _LosableTone(), AudioFollower(48000), threading.Event()
    feed = AudioFeed(source, follower, stop)
    feed.start()
    try:
        assert wait_until(lambda: follower.instant(Band.RMS) > 0.3)
        source.lost = True
        assert wait_until(lambda: follower.instant(Band.RMS) == 0.0)
        assert feed.is_alive()
        source.lost = False
        assert wait_until(lambda: follower.instant(Band.RMS) > 0.3)
    finally:
        stop.set()
        feed.join(2.0)
    lost = [r for r in caplog.records if "audio input lost" in r.getMessage()]
    assert len(lost) == 1 and "disconnected" in lost[0].getMessage()  # once per loss, not per read


def test_an_ndi_audio_source_not_found_is_one_line_not_a_stop(monkeypatch, caplog):
    from bridges import ndi

    def not_found(name: str) -> Any:
        raise BridgeError(f"NDI source {name!r} not found within 5.0 s; sources seen: none")

    monkeypatch.setattr(ndi, "NdiAudioSource", not_found)
    music = Music(MusicSettings(audio_ndi="Ableton"), ControlState(), lambda: 0.0)
    music.start()
    assert music.follower is None
    assert any("'Ableton' not found" in r.getMessage() for r in caplog.records)
    music.close()


def test_a_midi_clock_on_an_in_memory_port_sets_the_tempo_and_the_beat(monkeypatch):
    from engine.tempo import midi_port
    from tests.test_tempo_midi_port import FakeMido, Message

    mido = FakeMido(["Clock Out 20:0", "Other 24:0"])
    monkeypatch.setattr(midi_port, "import_mido", lambda: mido)
    clock = Clock()
    settings = MusicSettings(source=TempoSource.MIDI_CLOCK, midi_port="Clock Out")  # a name prefix
    music = Music(settings, ControlState(), lambda: 0.0, now=clock)
    music.start()
    (port,) = mido.ports
    assert port.name == "Clock Out 20:0"
    port.callback(Message(0xFA))  # start: the next clock is beat 0
    period = 60.0 / 125.0 / 24
    for pulse in range(24 * 8):
        clock.t = 1.0 + pulse * period
        port.callback(Message(0xF8))
    music.frame(clock.t, {})
    assert music.clock.bpm == pytest.approx(125.0, abs=0.01)
    assert music.clock.beat(clock.t) == pytest.approx((24 * 8 - 1) / 24, abs=1e-3)
    music.close()
    assert port.closed == 1


def test_link_is_followed_read_only(monkeypatch):
    from engine.tempo import link
    from tests.test_tempo_link import FakeBinding, FakeLink

    monkeypatch.setattr(link, "import_link", lambda: FakeBinding)
    music = Music(MusicSettings(source=TempoSource.LINK), ControlState(), lambda: 0.0, now=lambda: 2.0)
    music.start()
    music.frame(2.0, {})  # the fake session: 128 BPM, beat 0 two seconds before its clock's now
    assert music.clock.bpm == 128.0
    assert music.clock.beat(2.0) == pytest.approx(2.0 * 128.0 / 60.0)
    music.close()
    assert FakeLink.created[-1].enabled is False


def test_recalling_the_same_sequence_and_modulators_keeps_them_running(rig):
    rig.send("/sequence", "{steps: [a cat, a dog], every: 1bar}")
    rig.send("/modulators", "[{kind: envelope, name: hit, target: delta, attack: 0, decay: 1, sustain: 0}]")
    rig.commit()
    rig.send("/sequence/start")
    rig.send("/mod/trigger", "hit")
    rig.music.frame(0.0, {"delta": 1.0})
    assert rig.state.held()
    rig.send("/sequence", "{steps: [a cat, a dog], every: 1bar}")  # a scene recall with the same values
    rig.send("/modulators", "[{kind: envelope, name: hit, target: delta, attack: 0, decay: 1, sustain: 0}]")
    rig.commit()
    assert rig.music.frame(0.1, {"delta": 1.0})["delta"] > 1.0  # the envelope still decays
    assert rig.music.status().sequence_step == 0  # and the sequence still plays (a restart: -1)
    rig.send("/sequence", "{steps: [a fox], every: 1bar}")
    rig.commit()
    rig.music.frame(0.2, {})
    assert rig.state.held() == [] and rig.music.status().sequence_step == -1  # another one: stopped


def test_the_operator_pages_json_sets_modulators_and_a_sequence(rig):
    from engine.control.dispatch import json_args

    for name, value in (
        ("modulators", [{"target": "delta", "depth": 0.2}]),
        ("sequence", {"steps": ["a cat"], "every": "2bars"}),
    ):
        spec = params.REGISTRY[name]
        _replies, error = rig.dispatcher.handle_request(spec.osc_address, json_args(spec, value), SENDER)
        assert error is None
    changes = rig.commit()
    assert changes["modulators"] == [{"target": "delta", "rate": "1bar", "depth": 0.2}]
    assert changes["sequence"] == {"steps": ["a cat"], "every": "2bars"}
