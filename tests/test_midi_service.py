"""MIDI controllers end to end without hardware: the in-memory mido backend (engine.midi.loopback)
plays the controller, the MIDI service writes through the OSC dispatcher into ControlState."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import mido
import pytest
import yaml
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.control.service import ControlService, ControlSettings
from engine.control.state import ControlState
from engine.midi import loopback
from engine.midi.mapping import MappingError, check_mapping
from engine.midi.service import MidiService, MidiSettings, coalesce
from engine.midi.surface import Command, Surface
from tests.fakes import wait_until

PORT = "Loopback APC 20:0"  # ALSA-style: the client:port numbers follow the name
SENDER = ("127.0.0.1", 50000)


def cc(control: int, value: int, channel: int = 0) -> mido.Message:
    return mido.Message("control_change", control=control, value=value, channel=channel)


def note(number: int, velocity: int = 100, on: bool = True) -> mido.Message:
    return mido.Message("note_on" if on else "note_off", note=number, velocity=velocity)


def datagram(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


class Rig:
    """ControlState + the control service's dispatcher + a MIDI service on the loopback backend;
    ``commit`` plays the frame loop's part (pending changes become applied)."""

    def __init__(self, folder: Path, bindings: list[dict[str, Any]], profile: str | None = None, **top: Any):
        loopback.reset()
        self.folder = folder
        (folder / "scenes").mkdir(parents=True, exist_ok=True)
        midi_dir = folder / "midi"
        midi_dir.mkdir(exist_ok=True)
        data = {"input": "Loopback APC", "profile": profile, "bindings": bindings, **top}
        (midi_dir / "show.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        if profile is not None:
            (midi_dir / "devices").mkdir(exist_ok=True)
            (midi_dir / "devices" / f"{profile}.yaml").write_text(
                "name: Test pad\ninit:\n  - [0x00, 0x20, 0x29, 0x02, 0x11, 0x77, 0x08]\n"
                "colors: {off: 0, green: 1, red: 3}\non: green\noff: off\n"
            )
        self.state = ControlState({"guidance_scale": 1.0, "bypass": False, "delta": 1.0, "seed": 2})
        self.announced: list[tuple[str, list[Any]]] = []
        self.service = ControlService(
            ControlSettings(port=0, feedback=[], oscquery_port=None, scenes_dir=str(folder / "scenes")),
            self.state,
            lambda values, crossfade, due=None: self.state.write(values, crossfade, due=due),
            dict,
        )
        self.service.feedback.send = lambda address, args: self.announced.append((address, list(args)))
        self.midi = MidiService(
            MidiSettings(("show",), midi_dir, poll_s=0.2, feedback_hz=100.0),
            self.service.dispatcher,
            self.state.latest,
            self.state.applied,
            self.service.announce,
            backend=mido.Backend("engine.midi.loopback"),
        )
        self.service.attach_midi(self.midi)

    def start(self, plugged: bool = True) -> Rig:
        if plugged:
            loopback.plug(PORT)
        self.service.start()
        if plugged:
            assert wait_until(lambda: self.midi.controllers[0].connected, 5)
        return self

    def play(self, *messages: mido.Message) -> None:
        turns = self.midi.turns
        for message in messages:
            loopback.play(PORT, message)
        assert wait_until(lambda: not self.midi._inbox and self.midi.turns > turns, 5)
        time.sleep(0.05)  # the turn that took the last message has written it

    def commit(self) -> dict[str, Any]:
        pending = self.state.take_pending()
        if pending is None:
            return {}
        self.state.mark_applied(pending.changes)
        return pending.changes

    def osc(self, address: str, *args: Any) -> list[str]:
        replies = self.service.dispatcher.handle_datagram(datagram(address, *args), SENDER)
        return [str(r.args[0]) for r in replies if r.address == "/engine/error"]

    def errors(self) -> list[str]:
        return [str(args[0]) for address, args in self.announced if address == "/engine/error"]

    def midi_status(self) -> str:
        return next((args[0] for address, args in reversed(self.announced) if address == "/engine/midi"), "")

    def mapping_file(self) -> dict[str, Any]:
        return yaml.safe_load((self.folder / "midi" / "show.yaml").read_text())

    def close(self) -> None:
        self.service.close()
        loopback.reset()


@pytest.fixture
def make(tmp_path):
    rigs: list[Rig] = []

    def build(bindings: list[dict[str, Any]], **kwargs: Any) -> Rig:
        rig = Rig(tmp_path, bindings, **kwargs)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        rig.close()


# ----------------------------------------------------------------------------- the backend


def test_the_loopback_backend_lists_plays_and_forgets_devices():
    loopback.reset()
    backend = mido.Backend("engine.midi.loopback")
    assert backend.get_input_names() == []
    loopback.plug("Pad 1", output=False)
    assert backend.get_input_names() == ["Pad 1"] and backend.get_output_names() == []
    got: list[Any] = []
    port = backend.open_input("Pad 1", callback=got.append)
    assert loopback.play("Pad 1", cc(1, 5)) == 1 and got == [cc(1, 5)]
    with pytest.raises(OSError, match="no loopback output"):
        backend.open_output("Pad 1")
    loopback.unplug("Pad 1")
    assert loopback.play("Pad 1", cc(1, 6)) == 0 and got == [cc(1, 5)]
    port.close()
    port.close()  # twice is fine
    loopback.reset()


# ----------------------------------------------------------------------------- CC into the engine's state


def test_cc_1_moves_guidance_through_the_dispatcher_and_only_the_newest_value_lands(make):
    rig = make([{"cc": 1, "to": "guidance_scale", "range": [0, 5], "takeover": "jump"}]).start()
    rig.play(cc(1, 127))
    assert rig.commit() == {"guidance_scale": 5.0}
    rig.play(*[cc(1, v) for v in range(128)], cc(1, 0), cc(1, 64))
    assert rig.commit() == {"guidance_scale": pytest.approx(64 / 127 * 5)}
    assert rig.state.applied()["guidance_scale"] == pytest.approx(64 / 127 * 5)


def test_a_flood_of_10000_ccs_changes_nothing_but_the_newest_values(make):
    rig = make(
        [
            {"cc": 1, "to": "guidance_scale", "range": [0, 5], "takeover": "jump"},
            {"cc": 2, "to": "delta", "range": [0, 1], "takeover": "jump"},
        ]
    ).start()
    before = rig.state.applied()
    flood = [cc(1 + i % 2, (i * 7) % 128) for i in range(10_000)]
    rig.play(*flood)
    changes = rig.commit()
    assert set(changes) == {"guidance_scale", "delta"}
    assert changes["guidance_scale"] == pytest.approx(((9_998 * 7) % 128) / 127 * 5)
    assert changes["delta"] == pytest.approx(((9_999 * 7) % 128) / 127)
    after = rig.state.applied()
    assert {k: v for k, v in after.items() if k not in changes} == {
        k: v for k, v in before.items() if k not in changes
    }
    assert rig.midi.commands_written < 10_000  # coalesced per turn
    assert rig.errors() == []


def test_coalescing_keeps_the_newest_per_key_and_every_button_in_order():
    commands = [
        Command("guidance_scale", (1.0,), "guidance_scale"),
        Command("tempo_tap", (), None),
        Command("guidance_scale", (2.0,), "guidance_scale"),
        Command("tempo_tap", (), None),
        Command("delta", (0.5,), "delta"),
    ]
    assert coalesce(commands) == [
        Command("guidance_scale", (2.0,), "guidance_scale"),
        Command("tempo_tap", (), None),
        Command("tempo_tap", (), None),
        Command("delta", (0.5,), "delta"),
    ]


def test_a_refused_value_is_answered_on_engine_error_and_the_state_is_kept(make):
    rig = make([{"note": 60, "to": "sequence_jump", "step": 2}, {"note": 36, "to": "bypass"}]).start()
    rig.play(note(60))
    assert any(e.startswith("sequence_jump: ") for e in rig.errors()), rig.announced  # as OSC answers it
    rig.play(note(36))  # the service goes on
    assert rig.commit() == {"bypass": True}


# ----------------------------------------------------------------------------- takeover, encoders, pairs


def test_pickup_after_an_osc_change_waits_until_the_fader_passes_the_value(make):
    rig = make([{"cc": 1, "to": "guidance_scale", "range": [0, 10]}]).start()
    rig.play(cc(1, 13))  # 1.02: within one step of 1.0, picked up at once
    assert rig.commit()["guidance_scale"] == pytest.approx(13 / 127 * 10)
    assert rig.osc("/guidance_scale", 8.0) == []
    rig.commit()
    rig.play(cc(1, 20), cc(1, 40), cc(1, 60))  # below 8.0 (= 101.6): nothing
    assert rig.commit() == {}
    rig.play(cc(1, 110))  # passed 8.0 on the way up: it follows
    assert rig.commit()["guidance_scale"] == pytest.approx(110 / 127 * 10)
    rig.play(cc(1, 90))
    assert rig.commit()["guidance_scale"] == pytest.approx(90 / 127 * 10)


def test_jump_and_scale_takeover_from_the_mapping(make):
    rig = make(
        [
            {"cc": 1, "to": "guidance_scale", "range": [0, 10], "takeover": "jump"},
            {"cc": 2, "to": "delta", "range": [0, 1], "takeover": "scale"},
        ]
    ).start()
    rig.osc("/guidance_scale", 8.0)
    rig.osc("/delta", 0.5)
    rig.commit()
    rig.play(cc(1, 0))
    assert rig.commit() == {"guidance_scale": 0.0}  # jump: the fader wins at once
    rig.play(cc(2, 0))  # scale: the first touch far from the value is only remembered
    assert rig.commit() == {}
    rig.play(cc(2, 127))  # the whole travel up: value and fader meet at the end
    assert rig.commit() == {"delta": 1.0}


def test_the_three_relative_encodings_step_from_the_current_value(make):
    rig = make(
        [
            {"cc": 16, "to": "seed", "mode": "relative_twos", "step": 1},
            {"cc": 17, "to": "guidance_scale", "mode": "relative_offset", "step": 0.5, "range": [0, 10]},
            {"cc": 18, "to": "delta", "mode": "relative_sign", "step": 0.1},
        ]
    ).start()
    rig.play(cc(16, 1), cc(16, 1), cc(16, 127))  # +1 +1 -1 from 2
    rig.play(cc(17, 66))  # binary offset: 64 + 2 = +2 ticks of 0.5 from 1.0
    rig.play(cc(18, 64 + 3))  # sign-magnitude: bit 6 set = down 3 ticks of 0.1 from 1.0
    changes = rig.commit()
    assert changes["seed"] == 3
    assert changes["guidance_scale"] == pytest.approx(2.0)
    assert changes["delta"] == pytest.approx(0.7)
    rig.play(cc(17, 64 - 60))  # clamped to the range's low end
    assert rig.commit()["guidance_scale"] == 0.0


def test_a_14_bit_pair_gives_the_fine_value():
    mapping = check_mapping(
        {"input": "x", "bindings": [{"cc": [1, 33], "to": "delta", "range": [0, 1], "takeover": "jump"}]}
    )
    surface = Surface(mapping, {"delta": 0.0}.get, time.monotonic)
    (first,) = surface.receive(cc(1, 64))
    assert first.args[0] == pytest.approx((64 << 7) / 16383)
    (fine,) = surface.receive(cc(33, 100))
    assert fine.args[0] == pytest.approx((64 << 7 | 100) / 16383)
    assert surface.receive(cc(34, 5)) == []  # not bound


def test_toggle_momentary_and_envelope_notes(make):
    rig = make(
        [
            {"note": 36, "to": "bypass"},
            {"note": 37, "to": "pause", "mode": "momentary"},
            {"cc": 64, "to": "similarity_filter_enabled"},
        ]
    ).start()
    rig.play(note(36), note(36, 0))  # a press flips; the release (velocity 0) does nothing
    assert rig.commit()["bypass"] is True
    rig.play(note(36), note(36, on=False))
    assert rig.commit()["bypass"] is False
    rig.play(note(37))
    assert rig.commit() == {"pause": True}
    rig.play(note(37, on=False))
    assert rig.commit() == {"pause": False}
    rig.play(cc(64, 127), cc(64, 0))
    assert rig.commit() == {"similarity_filter_enabled": True}  # a cc button: 127 presses, 0 releases
    mapping = check_mapping(
        {"input": "x", "bindings": [{"note": 50, "to": "mod_trigger", "modulator": "kick"}]}
    )
    surface = Surface(mapping, {}.get, time.monotonic)
    assert surface.receive(note(50)) == [Command("mod_trigger", ("kick",), None)]
    assert surface.receive(note(50, on=False)) == [Command("mod_release", ("kick",), None)]


def test_a_program_change_loads_the_scene_at_its_index():
    mapping = check_mapping(
        {"input": "x", "bindings": [{"program": True, "to": "preset_load", "scenes": ["intro", "drop"]}]}
    )
    surface = Surface(mapping, {}.get, time.monotonic)
    assert surface.receive(mido.Message("program_change", program=1)) == [
        Command("preset_load", ("drop",), None)
    ]
    assert surface.receive(mido.Message("program_change", program=5)) == []


# ----------------------------------------------------------------------------- LEDs, hotplug


def test_leds_show_the_values_are_resent_after_a_scene_load_and_on_reconnect(make):
    rig = make(
        [
            {"cc": 1, "to": "guidance_scale", "range": [0, 10]},
            {"note": 36, "to": "bypass", "color": "red"},
            {"note": 40, "to": "preset_load", "scene": "intro"},
        ],
        profile="pad",
    ).start()
    sysex = mido.Message("sysex", data=(0x00, 0x20, 0x29, 0x02, 0x11, 0x77, 0x08))
    assert wait_until(lambda: len(loopback.sent(PORT)) >= 4, 5)
    sent = loopback.sent(PORT)
    assert sent[0] == sysex  # the profile's mode switch first
    assert cc(1, round(1.0 / 10 * 127)) in sent
    assert note(36, 0) in sent and note(40, 0) in sent
    loopback.clear_sent(PORT)
    rig.osc("/bypass", 1)
    rig.commit()
    assert wait_until(lambda: note(36, 3) in loopback.sent(PORT), 5)  # lit red (3)
    time.sleep(0.1)
    assert loopback.sent(PORT) == [note(36, 3)]  # only what changed
    loopback.clear_sent(PORT)
    rig.service.scenes.save("intro", rig.state.applied())
    assert rig.osc("/preset/load", "intro") == []
    assert wait_until(lambda: len(loopback.sent(PORT)) >= 3, 5)
    assert note(40, 1) in loopback.sent(PORT)  # the loaded scene's button lights (green: on)
    # hotplug: gone, then back with other ALSA numbers
    loopback.unplug(PORT)
    assert wait_until(lambda: "waiting for 'Loopback APC'" in rig.midi_status(), 5)
    loopback.plug("Loopback APC 24:0")
    assert wait_until(lambda: "connected to 'Loopback APC 24:0'" in rig.midi_status(), 5)
    assert wait_until(lambda: len(loopback.sent("Loopback APC 24:0")) >= 4, 5)
    assert loopback.sent("Loopback APC 24:0")[0] == sysex
    loopback.play("Loopback APC 24:0", note(36))
    assert wait_until(lambda: rig.state.latest("bypass") is False, 5)


def test_a_missing_device_is_waited_for_and_is_not_fatal(make):
    rig = make([{"cc": 1, "to": "guidance_scale"}]).start(plugged=False)
    assert "waiting for 'Loopback APC'" in rig.midi_status()
    loopback.plug(PORT)
    assert wait_until(lambda: rig.midi.controllers[0].connected, 5)


# ----------------------------------------------------------------------------- learn


def test_learn_over_osc_binds_the_next_control_saves_it_and_plays_it(make):
    rig = make([{"cc": 1, "to": "guidance_scale"}]).start()
    assert rig.osc("/midi/learn", "delta") == []
    assert "learning delta" in rig.midi_status()
    rig.play(note(5, 0))  # a note off is no control being moved: still learning
    assert rig.midi.learning is not None
    rig.play(cc(21, 90))
    assert rig.midi.learning is None
    assert "learned cc 21 ch 1 -> delta" in rig.midi_status()
    saved = rig.mapping_file()
    assert {"cc": 21, "channel": 1, "to": "delta"} in saved["bindings"]
    assert rig.commit() == {}  # the learning message itself changed nothing
    rig.play(cc(21, 127), cc(21, 20))  # delta 1.0 of 0..5 sits at 25.4: passed on the way down
    assert rig.commit() == {"delta": pytest.approx(20 / 127 * 5)}
    # learning the same target again moves it to the new control; the old one is gone
    assert rig.osc("/midi/learn", "delta") == []
    rig.play(cc(22, 3))
    bound = [b for b in rig.mapping_file()["bindings"] if b["to"] == "delta"]
    assert bound == [{"cc": 22, "channel": 1, "to": "delta"}]
    # forget
    assert rig.osc("/midi/forget", "delta") == []
    assert all(b["to"] != "delta" for b in rig.mapping_file()["bindings"])
    assert any("no MIDI binding drives delta" in e for e in rig.osc("/midi/forget", "delta"))


def test_learn_refuses_what_cannot_be_bound_and_keeps_state(make):
    rig = make([]).start()
    (error,) = rig.osc("/midi/learn", "brightness")
    assert "'brightness' cannot be learnt; allowed:" in error and "guidance_scale" in error
    (error,) = rig.osc("/midi/learn", "preset_load")
    assert "preset_load needs its scene" in error
    assert rig.midi.learning is None
    assert rig.osc("/midi/learn", "quantize") == []  # a choice: a note cannot drive it, a cc can
    rig.play(note(9))
    assert "note cannot drive quantize" in rig.midi_status() and rig.midi.learning is not None
    rig.play(cc(9, 0))
    assert rig.midi.learning is None and rig.mapping_file()["bindings"] == [
        {"cc": 9, "channel": 1, "to": "quantize"}
    ]
    assert rig.osc("/midi/learn", "preset_load", "intro") == []
    assert rig.osc("/midi/cancel") == []
    assert rig.midi.learning is None


def test_midi_addresses_without_midi_name_the_config_key(tmp_path):
    state = ControlState()
    service = ControlService(
        ControlSettings(port=0, feedback=[], oscquery_port=None, scenes_dir=str(tmp_path)), state, print, dict
    )
    replies = service.dispatcher.handle_datagram(datagram("/midi/learn", "delta"), SENDER)
    assert "MIDI is off in this engine" in replies[0].args[0] and "midi.mappings" in replies[0].args[0]
    service.close()


# ----------------------------------------------------------------------------- refused files


@pytest.mark.parametrize(
    ("bindings", "named"),
    [
        ([{"cc": 1, "to": "brightness"}], "bindings[0].to: 'brightness' is not a live parameter"),
        ([{"cc": 128, "to": "delta"}], "bindings[0].cc: 128 is not a cc"),
        (
            [{"note": 1, "to": "bypass", "color": "purple"}],
            "bindings[0].color 'purple' is not in the profile",
        ),
    ],
)
def test_malformed_mapping_files_are_refused_with_the_key_named(tmp_path, bindings, named):
    with pytest.raises((MappingError, ValueError), match=named.replace("[", r"\[").replace("]", r"\]")):
        Rig(tmp_path, bindings, profile="pad")
    loopback.reset()


def test_preflight_names_a_bad_mapping_and_a_missing_backend(tmp_path):
    from engine.config import load_config
    from engine.preflight import check_start

    (tmp_path / "midi").mkdir()
    (tmp_path / "midi" / "bad.yaml").write_text(
        "input: x\nbindings: [{cc: 1, to: guidance_scale, mode: toggle}]\n"
    )
    config = load_config(None, overrides=["midi.mappings=[bad, absent]", "midi.backend=engine.midi.loopback"])
    problems = [str(p) for p in check_start(config, midi_dir=tmp_path / "midi")]
    assert any("bindings[0].mode: 'toggle' needs a switch parameter" in p for p in problems), problems
    assert any("midi mapping 'absent' does not exist" in p and "available: bad" in p for p in problems)
    config = load_config(None, overrides=["midi.mappings=[bad]", "midi.backend=no.such.backend"])
    problems = [str(p) for p in check_start(config, midi_dir=tmp_path / "midi")]
    assert any(p.startswith("midi.backend: the MIDI backend 'no.such.backend' cannot load") for p in problems)


def test_midi_ports_says_none_and_why(monkeypatch, tmp_path, capsys):
    from engine.cli import main
    from engine.midi.ports_report import no_ports_reason

    loopback.reset()
    assert main(["midi", "ports", "--set", "midi.backend=engine.midi.loopback"]) == 0
    assert "no MIDI ports:" in capsys.readouterr().err
    loopback.plug("Loopback APC 20:0")
    assert main(["midi", "ports", "--set", "midi.backend=engine.midi.loopback"]) == 0
    out = capsys.readouterr().out
    assert "in   Loopback APC 20:0" in out and "out  Loopback APC 20:0" in out
    loopback.reset()
    assert "snd-seq" in no_ports_reason("linux", tmp_path / "absent")
    assert "loopMIDI" in no_ports_reason("win32")
    assert "IAC Driver" in no_ports_reason("darwin")


def test_the_worker_survives_a_message_it_cannot_read(make):
    rig = make([{"cc": 1, "to": "guidance_scale", "takeover": "jump"}]).start()

    class Odd:
        type = "control_change"
        channel = 0
        control = 1
        value = 300  # not a data byte

    loopback.play(PORT, Odd())  # type: ignore[arg-type]
    rig.play(cc(1, 0))
    assert rig.commit() == {"guidance_scale": 0.0}
    assert threading.active_count() > 0 and rig.midi._thread.is_alive()


def test_the_readme_mapping_example_loads_with_its_profile():
    from engine.midi.profile import load_profile
    from engine.midi.service import check_colors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## MIDI controllers", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    mapping = check_mapping(yaml.safe_load(example))
    presets = Path(__file__).resolve().parents[1] / "presets" / "midi"
    assert mapping.profile == "apc_mini"
    check_colors(mapping, load_profile(presets, mapping.profile), "readme")
    assert mapping.find("cc", 1, 1) is not None and mapping.find("cc", 1, 1).target == "guidance_scale"


def test_a_fader_on_a_coarse_int_keeps_following_after_its_own_rounded_values():
    """The value an INT binding set is rounded; that is not a change from elsewhere (failed before:
    the rounding re-armed the pickup and the fader stuck until it crossed the value again)."""
    mapping = check_mapping({"input": "x", "bindings": [{"cc": 1, "to": "seed", "range": [0, 4]}]})
    state = {"seed": 0}
    surface = Surface(mapping, state.get, time.monotonic)
    played = []
    for value in (0, 20, 40, 60, 80, 100, 127):
        for command in surface.receive(cc(1, value)):
            state["seed"] = command.args[0]
            played.append(command.args[0])
        surface.settled()
    assert played == [0, 1, 1, 2, 3, 3, 4]


def test_unbind_removes_one_binding_and_a_controller_cannot_play_learn_or_status(make):
    rig = make([{"cc": 1, "to": "guidance_scale"}, {"cc": 2, "to": "guidance_scale"}]).start()
    assert rig.osc("/midi/unbind", "show", 0) == []
    assert rig.mapping_file()["bindings"] == [{"cc": 2, "to": "guidance_scale"}]
    (error,) = rig.osc("/midi/unbind", "other", 0)
    assert "'other' is not a loaded mapping; allowed: show" in error
    (error,) = rig.osc("/midi/learn", "midi_cancel")
    assert "'midi_cancel' cannot be learnt" in error
    with pytest.raises(
        ValueError, match="status is an action for OSC and the page only and cannot be played"
    ):
        check_mapping({"input": "x", "bindings": [{"note": 1, "to": "status"}]})
