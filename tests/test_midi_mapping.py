"""MIDI mapping files: the example loads, every refusal names its key path and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine import params
from engine.midi.mapping import (
    ACTION_ARGUMENTS,
    MAX_MAPPING_BYTES,
    Curve,
    MappingError,
    Mode,
    Role,
    Source,
    Takeover,
    bindable,
    check_mapping,
    load_mapping,
    relative_ticks,
    role_of,
)

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "presets" / "midi"


def mapping(*bindings: dict) -> dict:
    return {"input": "APC mini", "bindings": list(bindings)}


def refused(*bindings: dict) -> str:
    with pytest.raises(ValueError) as info:
        check_mapping(mapping(*bindings))
    return str(info.value)


def test_the_example_file_loads_with_every_kind():
    loaded = load_mapping(FOLDER, "example")
    assert loaded.input == "APC mini" and loaded.output == "APC mini" and loaded.profile == "apc_mini"
    kinds = {(b.source, len(b.numbers)) for b in loaded.bindings}
    assert {
        (Source.CC, 1),
        (Source.CC, 2),
        (Source.NOTE, 1),
        (Source.PITCHBEND, 0),
        (Source.PROGRAM, 0),
    } <= kinds
    assert {b.mode for b in loaded.bindings} == set(Mode)
    roles = {role_of(params.REGISTRY[b.target]) for b in loaded.bindings}
    assert roles == set(Role)
    by_target = {b.target: b for b in loaded.bindings if b.channel is None}
    guidance = by_target["guidance_scale"]
    assert (guidance.range, guidance.curve, guidance.takeover) == ((0.0, 5.0), Curve.LINEAR, Takeover.PICKUP)
    assert by_target["delta"].numbers == (1, 33) and by_target["delta"].fourteen_bit
    assert by_target["delta"].range == (0.0, 5.0)  # the whole registry range by default
    assert by_target["seed"].step == 1.0 and by_target["seed"].curve is None
    assert by_target["ip_adapter_scale"].step == pytest.approx(2.0 / 127)
    assert by_target["preset_load"].argument in ("intro", ("intro", "verse", "drop"))
    assert by_target["sequence_jump"].argument == 2
    assert by_target["mod_depth"].argument == 0 and by_target["mod_depth"].range == (0.0, 1.0)
    assert loaded.find("program", 3).argument == ("intro", "verse", "drop")


def test_find_picks_the_channel_specific_binding_first():
    loaded = check_mapping(
        mapping(
            {"note": 40, "to": "preset_load", "scene": "intro"},
            {"note": 40, "channel": 10, "to": "preset_save", "scene": "intro"},
            {"cc": [1, 33], "to": "delta"},
            {"cc": 7, "channel": 2, "to": "guidance_scale"},
        )
    )
    assert loaded.find("note", 10, 40).target == "preset_save"
    assert loaded.find(Source.NOTE, 1, 40).target == "preset_load"
    assert loaded.find("note", 1, 41) is None
    assert loaded.find("cc", 5, 1).target == loaded.find("cc", 5, 33).target == "delta"
    assert loaded.find("cc", 2, 7).target == "guidance_scale" and loaded.find("cc", 3, 7) is None
    assert loaded.find("pitchbend", 1) is None


def test_output_defaults_to_the_input_and_a_profile_is_a_name():
    assert check_mapping({"input": "nanoKONTROL2"}).output == "nanoKONTROL2"
    assert (
        check_mapping({"input": "X", "output": "Y", "profile": "apc_mini", "bindings": []}).profile
        == "apc_mini"
    )
    with pytest.raises(ValueError, match=r"^profile: '\.\./x' is not a profile name; allowed: "):
        check_mapping({"input": "X", "profile": "../x"})
    with pytest.raises(ValueError, match=r"^input: missing; allowed: "):
        check_mapping({"bindings": []})
    with pytest.raises(ValueError, match=r"^inputs: unknown key; allowed: input, output, profile, bindings"):
        check_mapping({"inputs": "X"})


def test_an_unknown_target_names_the_live_parameters_from_the_registry():
    message = refused(
        {"cc": 1, "to": "guidance_scale"}, {"cc": 2, "to": "delta"}, {"cc": 3, "to": "brightness"}
    )
    assert message.startswith(
        "bindings[2].to: 'brightness' is not a live parameter; allowed: guidance_scale, delta"
    )
    assert message.endswith(", ".join(bindable()))
    numbers = [
        s.name for s in params.REGISTRY.values() if s.kind in (params.ParamKind.FLOAT, params.ParamKind.INT)
    ]
    assert set(numbers) <= set(bindable())


@pytest.mark.parametrize(
    "name", ["prompt", "prompt_blend", "t_index_list", "modulators", "resolution", "mod_add"]
)
def test_text_lists_blends_and_structs_are_refused_with_what_is_allowed(name):
    message = refused({"cc": 1, "to": name})
    assert message.startswith(f"bindings[0].to: {name} is a") and "cannot be played from MIDI" in message
    assert "; allowed: " + ", ".join(bindable()) in message


def test_a_range_outside_the_registry_range():
    message = refused({"cc": 48, "to": "guidance_scale", "range": [0, 50]})
    assert message == "bindings[0].range: [0, 50] is outside guidance_scale's range; allowed: within [0, 20]"
    assert refused({"cc": 48, "to": "seed", "range": [0, 1.5]}).startswith(
        "bindings[0].range: [0, 1.5] is not whole"
    )
    assert "allowed: two different numbers" in refused({"cc": 48, "to": "delta", "range": [1, 1]})
    assert "bindings[0].range: missing; allowed: [low, high] for mod_depth" in refused(
        {"cc": 20, "to": "mod_depth", "modulator": 0}
    )
    assert "allowed: within [0.000976562, 100]" in refused(
        {"cc": 20, "to": "mod_rate", "modulator": "wobble", "range": [0, 4]}
    )


def test_a_mode_that_does_not_fit_the_parameter():
    message = refused(
        *[{"cc": n, "to": "delta"} for n in range(4)], {"note": 1, "to": "guidance_scale", "mode": "toggle"}
    )
    assert message == (
        "bindings[4].mode: 'toggle' needs a switch parameter (similarity_filter_enabled is ok, "
        "guidance_scale is a number); allowed: absolute | relative_twos | relative_offset | relative_sign"
    )
    assert refused({"note": 1, "to": "bypass", "mode": "absolute"}).endswith("allowed: toggle | momentary")
    assert refused({"note": 1, "to": "tempo_tap", "mode": "toggle"}).endswith("allowed: trigger")
    assert refused({"cc": 1, "to": "delta", "mode": "fast"}).startswith(
        "bindings[0].mode: 'fast' is not a mode"
    )
    relative_pair = refused({"cc": [1, 33], "to": "delta", "mode": "relative_twos"})
    assert (
        relative_pair.startswith("bindings[0].mode: 'relative_twos' needs a single cc")
        and "allowed:" in relative_pair
    )


def test_sources_that_cannot_drive_the_parameter():
    assert refused({"pitchbend": True, "to": "bypass"}) == (
        "bindings[0].pitchbend: pitchbend cannot drive bypass (a switch); allowed: cc | note"
    )
    assert refused({"program": True, "to": "guidance_scale"}).endswith("allowed: preset_load | sequence_jump")
    assert refused({"note": 1, "to": "quantize"}).endswith("allowed: cc | pitchbend")


@pytest.mark.parametrize(
    ("binding", "start"),
    [
        ({"to": "delta"}, "bindings[0]: no source; allowed: exactly one of cc | note | pitchbend | program"),
        ({"cc": 1, "note": 2, "to": "delta"}, "bindings[0]: 2 sources (cc, note); allowed: exactly one of"),
        ({"cc": 128, "to": "delta"}, "bindings[0].cc: 128 is not a cc; allowed: 0..127, or [msb, lsb]"),
        ({"cc": [1, 1], "to": "delta"}, "bindings[0].cc: [1, 1] names one cc twice; allowed: two distinct"),
        ({"cc": True, "to": "delta"}, "bindings[0].cc: True is not a cc; allowed:"),
        ({"note": -1, "to": "bypass"}, "bindings[0].note: -1 is not a note number; allowed: 0..127"),
        ({"pitchbend": False, "to": "delta"}, "bindings[0].pitchbend: False; allowed: true"),
        ({"cc": 1, "channel": 0, "to": "delta"}, "bindings[0].channel: 0 is not a channel; allowed: 1..16"),
        ({"cc": 1, "to": "delta", "velocity": 1}, "bindings[0].velocity: unknown key; allowed: cc, note,"),
        (
            {"cc": 1, "to": "delta", "curve": "cubic"},
            "bindings[0].curve: 'cubic' is not allowed here; allowed: linear",
        ),
        (
            {"cc": 1, "to": "delta", "takeover": "x"},
            "bindings[0].takeover: 'x' is not allowed here; allowed: pickup",
        ),
        (
            {"cc": 1, "to": "bypass", "range": [0, 1]},
            "bindings[0].range: not used with bypass (a switch, toggle); allowed",
        ),
        ({"cc": 1, "to": "quantize", "curve": "exp"}, "bindings[0].curve: not used with quantize (a choice"),
        (
            {"cc": 1, "to": "delta", "mode": "relative_twos", "curve": "exp"},
            "bindings[0].curve: not used with delta",
        ),
        ({"note": 1, "to": "delta", "takeover": "jump"}, "bindings[0].takeover: not used with delta"),
        (
            {"cc": 1, "to": "delta", "step": 1},
            "bindings[0].step: not used with delta (a number, absolute); allowed",
        ),
        (
            {"cc": 1, "to": "seed", "mode": "relative_sign", "step": 0.5},
            "bindings[0].step: 0.5 is not allowed; allowed",
        ),
        (
            {"cc": 1, "to": "delta", "mode": "relative_sign", "step": -1},
            "bindings[0].step: -1 is not allowed; allowed",
        ),
        ("cc 1", "bindings[0]: 'cc 1' is not a mapping; allowed:"),
    ],
)
def test_malformed_bindings_name_the_key_and_what_is_allowed(binding, start):
    message = refused(binding)
    assert message.startswith(start), message
    assert "; allowed: " in message


@pytest.mark.parametrize(
    ("binding", "start"),
    [
        ({"note": 40, "to": "preset_load"}, "bindings[0]: preset_load needs 'scene'; allowed: a scene name"),
        (
            {"note": 40, "to": "preset_load", "scene": "../x"},
            "bindings[0].scene: '../x' is not a scene name; allowed",
        ),
        (
            {"note": 40, "to": "preset_load", "scenes": ["a"]},
            "bindings[0].scenes: not used here; allowed: scene",
        ),
        ({"program": True, "to": "preset_load"}, "bindings[0]: preset_load needs 'scenes'; allowed: a list"),
        (
            {"program": True, "to": "preset_load", "scene": "a"},
            "bindings[0].scene: not used here; allowed: scenes",
        ),
        (
            {"program": True, "to": "preset_load", "scenes": ["a", "con"]},
            "bindings[0].scenes[1]: 'con' is not a",
        ),
        (
            {"program": True, "to": "preset_load", "scenes": []},
            "bindings[0].scenes: [] is not a list of scenes",
        ),
        (
            {"program": True, "to": "sequence_jump", "step": 2},
            "bindings[0].step: not used with sequence_jump",
        ),
        (
            {"cc": 20, "to": "mod_depth", "range": [0, 1]},
            "bindings[0]: mod_depth needs 'modulator'; allowed: a",
        ),
        (
            {"note": 3, "to": "mod_trigger", "modulator": "a b"},
            "bindings[0].modulator: 'a b' is not a modulator",
        ),
        ({"note": 3, "to": "mod_enabled", "modulator": 99}, "bindings[0].modulator: 99 is not a modulator"),
        (
            {"note": 60, "to": "sequence_jump"},
            "bindings[0]: sequence_jump needs 'step'; allowed: a sequence step",
        ),
        (
            {"note": 60, "to": "sequence_jump", "step": 64},
            "bindings[0].step: 64 is not a step number; allowed: 0..63",
        ),
        (
            {"note": 41, "to": "tempo_tap", "scene": "a"},
            "bindings[0].scene: not used here; allowed: nothing for",
        ),
        (
            {"note": 41, "to": "tempo_tap", "modulator": 0},
            "bindings[0].modulator: not used here; allowed: nothing",
        ),
    ],
)
def test_action_arguments(binding, start):
    message = refused(binding)
    assert message.startswith(start), message
    assert "; allowed: " in message


def test_the_program_change_to_a_sequence_needs_no_step():
    loaded = check_mapping(mapping({"program": True, "channel": 16, "to": "sequence_jump"}))
    assert loaded.find("program", 16).argument is None and loaded.find("program", 1) is None


def test_two_bindings_on_the_same_source_and_channel():
    message = refused(
        {"cc": 7, "to": "delta"}, {"cc": 7, "channel": 3, "to": "strength"}, {"cc": 7, "to": "seed"}
    )
    assert message == (
        "bindings[2].cc: cc 7 on any channel is already bound by bindings[0] (delta); "
        "allowed: one binding per source and channel"
    )
    pair = refused({"cc": [1, 33], "to": "delta"}, {"cc": 33, "to": "strength"})
    assert pair.startswith("bindings[1].cc: cc 33 on any channel is already bound by bindings[0] (delta)")
    bend = refused(
        {"pitchbend": True, "channel": 2, "to": "delta"}, {"pitchbend": True, "channel": 2, "to": "bpm"}
    )
    assert bend.startswith("bindings[1].pitchbend: pitchbend on channel 2 is already bound by bindings[0]")
    check_mapping(
        mapping({"cc": 7, "to": "delta"}, {"note": 7, "to": "bypass"}, {"cc": 7, "channel": 1, "to": "bpm"})
    )


def test_the_action_table_names_registry_actions():
    for name in ACTION_ARGUMENTS:
        assert params.REGISTRY[name].kind is params.ParamKind.ACTION


def test_absolute_values_follow_range_curve_and_choices():
    loaded = check_mapping(
        mapping(
            {"cc": 1, "to": "guidance_scale", "range": [5, 1]},
            {"cc": 2, "to": "strength", "curve": "exp"},
            {"cc": 3, "to": "strength", "curve": "log", "channel": 1},
            {"cc": 4, "to": "quantize"},
            {"cc": 5, "to": "beats_per_bar"},
        )
    )
    inverted, exp, log, choice, integer = loaded.bindings
    assert inverted.value_at(0.0) == 5.0 and inverted.value_at(1.0) == 1.0 and inverted.value_at(0.5) == 3.0
    assert exp.value_at(0.5) < 0.5 < log.value_at(0.5) and exp.value_at(1.0) == pytest.approx(1.0)
    assert math.isclose(log.value_at(1.0), 1.0) and exp.value_at(0.0) == 0.0 == log.value_at(0.0)
    choices = params.REGISTRY["quantize"].choices
    assert [choice.value_at(i / 127) for i in (0, 127)] == [choices[0], choices[-1]]
    assert [choice.value_at(k / len(choices) + 0.01) for k in range(len(choices))] == list(choices)
    assert isinstance(integer.value_at(0.5), int)
    relative = check_mapping(mapping({"cc": 1, "to": "delta", "mode": "relative_twos"})).bindings[0]
    with pytest.raises(ValueError, match="needs an absolute binding"):
        relative.value_at(0.5)


def test_relative_encodings():
    assert [relative_ticks(Mode.RELATIVE_TWOS, raw) for raw in (1, 3, 127, 125, 0)] == [1, 3, -1, -3, 0]
    assert [relative_ticks(Mode.RELATIVE_OFFSET, raw) for raw in (64, 65, 63, 70)] == [0, 1, -1, 6]
    assert [relative_ticks(Mode.RELATIVE_SIGN, raw) for raw in (1, 65, 0, 67)] == [1, -1, 0, -3]
    with pytest.raises(ValueError, match="allowed: relative_offset, relative_sign, relative_twos"):
        relative_ticks(Mode.ABSOLUTE, 1)


@pytest.mark.parametrize("name", ["../x", "a/b", "con", "NUL", "", "a.yaml", "x" * 65, "/etc/passwd"])
def test_path_like_names_are_refused(tmp_path, name):
    (tmp_path / "a.yaml").write_text("input: X\n", encoding="utf-8")
    with pytest.raises(MappingError, match=r"is not a mapping name; allowed: 1 to 64 letters"):
        load_mapping(tmp_path, name)


def test_a_missing_file_names_the_available_ones(tmp_path):
    for name in ("show", "apc_mini"):
        (tmp_path / f"{name}.yaml").write_text("input: X\n", encoding="utf-8")
    (tmp_path / "bad name.yaml").write_text("input: X\n", encoding="utf-8")
    with pytest.raises(MappingError, match=r"'drop' does not exist in .*; available: apc_mini, show$"):
        load_mapping(tmp_path, "drop")
    with pytest.raises(MappingError, match="available: none"):
        load_mapping(tmp_path / "empty", "drop")


def test_file_errors_name_the_mapping(tmp_path):
    (tmp_path / "big.yaml").write_text("#" * (MAX_MAPPING_BYTES + 1), encoding="utf-8")
    with pytest.raises(MappingError, match="larger than"):
        load_mapping(tmp_path, "big")
    (tmp_path / "broken.yaml").write_text("input: [\n", encoding="utf-8")
    with pytest.raises(MappingError, match="'broken' cannot be read"):
        load_mapping(tmp_path, "broken")
    (tmp_path / "wrong.yaml").write_text(
        "input: X\nbindings:\n  - {cc: 1, to: brightness}\n", encoding="utf-8"
    )
    with pytest.raises(MappingError, match=r"^midi mapping 'wrong': bindings\[0\]\.to: 'brightness' is not"):
        load_mapping(tmp_path, "wrong")


def test_a_scene_named_no_stays_a_name_in_a_mapping_file(tmp_path):
    """YAML 1.1 read ``no`` / ``on`` / ``off`` as booleans (a scene named ``no`` was refused as
    ``False``); mapping files are read with YAML 1.2 booleans, as profiles are."""
    (tmp_path / "show.yaml").write_text("input: x\nbindings:\n  - {note: 1, to: preset_load, scene: no}\n")
    assert load_mapping(tmp_path, "show").bindings[0].argument == "no"
