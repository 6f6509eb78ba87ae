"""MIDI device profiles: the shipped files load with their exact LED values, refusals name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.midi.profile import (
    DEFAULT_PROFILE,
    DEVICES_FOLDER,
    MAX_INIT_MESSAGES,
    DeviceProfile,
    ProfileError,
    check_profile,
    load_profile,
    profile_names,
)

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "presets" / "midi"
SHIPPED = ("apc_mini", "apc_mini_mk2", "launch_control_xl", "xtouch_mini")


def minimal(**extra: Any) -> dict[str, Any]:
    return {"name": "Test pad", "colors": {"off": 0, "green": 1, "red": 3}, **extra}


def refused(data: Any) -> str:
    with pytest.raises(ValueError) as info:
        check_profile(data)
    return str(info.value)


def write(folder: Path, name: str, text: str) -> None:
    devices = folder / DEVICES_FOLDER
    devices.mkdir(parents=True, exist_ok=True)
    (devices / f"{name}.yaml").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- shipped profiles


def test_profile_names_lists_every_shipped_profile():
    assert set(SHIPPED) <= set(profile_names(FOLDER))
    assert profile_names(FOLDER) == sorted(profile_names(FOLDER))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_names_its_sources(name: str):
    profile = load_profile(FOLDER, name)
    assert isinstance(profile, DeviceProfile)
    assert profile.on in profile.colors.values() and profile.off in profile.colors.values()
    assert profile.on != profile.off
    text = (FOLDER / DEVICES_FOLDER / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("#") and "Source" in text.split("\nname:")[0]


def test_every_profile_in_the_folder_loads():
    for name in profile_names(FOLDER):
        assert load_profile(FOLDER, name).name


def test_apc_mini_velocities():
    apc = load_profile(FOLDER, "apc_mini")
    assert apc.port == "APC MINI" and apc.init == () and apc.channel == 1
    assert dict(apc.colors) == {
        "off": 0,
        "green": 1,
        "green_blink": 2,
        "red": 3,
        "red_blink": 4,
        "yellow": 5,
        "yellow_blink": 6,
    }
    assert (apc.on, apc.off) == (1, 0)
    assert apc.color("red") == 3 and apc.color(None) == 1


def test_launch_control_xl_velocities_and_template_sysex():
    xl = load_profile(FOLDER, "launch_control_xl")
    assert xl.port == "Launch Control XL"
    assert xl.init == ((0x00, 0x20, 0x29, 0x02, 0x11, 0x77, 0x08),)
    assert xl.channel == 9  # factory template 1 (slot 8) uses MIDI channel 9
    assert (xl.off, xl.on) == (12, 60)
    assert (xl.color("red"), xl.color("green"), xl.color("amber"), xl.color("yellow")) == (15, 60, 63, 62)
    # velocity = 16 * green + red + 12 (copy and clear) for every colour offered
    for name, (green, red) in {
        "off": (0, 0),
        "red_low": (0, 1),
        "red_medium": (0, 2),
        "red": (0, 3),
        "green_low": (1, 0),
        "green_medium": (2, 0),
        "green": (3, 0),
        "amber_low": (1, 1),
        "amber": (3, 3),
        "yellow": (3, 2),
    }.items():
        assert xl.color(name) == 16 * green + red + 12, name


def test_apc_mini_mk2_palette_and_full_brightness_channel():
    mk2 = load_profile(FOLDER, "apc_mini_mk2")
    assert mk2.port == "APC mini mk2" and mk2.init == ()
    assert mk2.channel == 7  # 100 % brightness, solid
    assert (mk2.color("red"), mk2.color("green"), mk2.color("blue"), mk2.color("white")) == (5, 21, 45, 3)
    assert (mk2.color("amber"), mk2.color("yellow")) == (9, 13)
    assert (mk2.on, mk2.off) == (21, 0)


def test_xtouch_mini_on_off_blink():
    xt = load_profile(FOLDER, "xtouch_mini")
    assert xt.port == "X-TOUCH MINI" and xt.init == () and xt.channel == 1
    assert dict(xt.colors) == {"off": 0, "on": 1, "blink": 2}
    assert (xt.on, xt.off) == (1, 0)


def test_an_unknown_colour_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^color 'purple' is not in the profile .*; allowed: off, green"):
        load_profile(FOLDER, "apc_mini").color("purple")


# --------------------------------------------------------------------------- check_profile


def test_a_minimal_profile_takes_the_brightest_as_on_and_the_darkest_as_off():
    profile = check_profile(minimal())
    assert (profile.on, profile.off, profile.channel, profile.init, profile.port) == (3, 0, None, (), None)


def test_without_colors_the_generic_127_and_0():
    profile = check_profile({"name": "Generic"})
    assert dict(profile.colors) == dict(DEFAULT_PROFILE.colors) == {"off": 0, "on": 127}
    assert (profile.on, profile.off) == (127, 0)


def test_names_on_off_and_channel_are_kept():
    profile = check_profile(minimal(on="green", off="off", channel=16, init=[[0x47, 0x7F]]))
    assert (profile.on, profile.off, profile.channel, profile.init) == (1, 0, 16, ((0x47, 0x7F),))


def test_an_unknown_key_is_named():
    assert refused(minimal(colours={"red": 3})) == (
        "colours: unknown key; allowed: name, port, init, colors, on, off, channel"
    )


def test_a_bare_boolean_key_is_refused_with_a_hint():
    assert refused({**minimal(), True: "green"}).startswith(
        "True: unknown key (a bare on/off read as a boolean: quote it); allowed: "
    )


@pytest.mark.parametrize("value", [128, -1, 1.5, True, "3"])
def test_a_colour_value_outside_0_127_is_refused(value: object):
    assert refused(minimal(colors={"off": 0, "red": value})).startswith(
        f"colors.red: {value!r}; allowed: a value 0..127"
    )


def test_a_colour_name_must_be_a_plain_name():
    assert refused(minimal(colors={"off": 0, "dark red": 1})).startswith(
        "colors: 'dark red' is not a colour name; allowed: "
    )
    assert refused(minimal(colors={})).startswith("colors: {}; allowed: ")


def test_an_init_byte_outside_the_data_range_is_refused():
    assert refused(minimal(init=[[0x00, 0x20, 0xF7]])).startswith(
        "init[0]: [0, 32, 247] is not SysEx data; allowed: 1 to 256 bytes 0..127 (without F0 and F7)"
    )
    assert refused(minimal(init=[[0xF0, 0x47]])).startswith("init[0]: ")
    assert refused(minimal(init=[[1], []])).startswith("init[1]: [] is not SysEx data")
    assert refused(minimal(init=[[1, True]])).startswith("init[0]: ")


def test_init_must_be_a_short_list():
    assert refused(minimal(init=[[1]] * (MAX_INIT_MESSAGES + 1))).startswith("init: ")
    assert refused(minimal(init="F0 00 F7")).startswith("init: 'F0 00 F7'; allowed: a list")


@pytest.mark.parametrize("value", [False, 0, ""])
def test_a_falsy_init_that_is_not_a_list_is_refused(value: object):
    # a bug fixed here: `init: false` (or 0, "") used to pass as "no SysEx"
    assert refused(minimal(init=value)).startswith(f"init: {value!r}; allowed: a list")


def test_on_and_off_must_name_a_colour():
    assert refused(minimal(on="blue")) == "on: 'blue' is not a colour; allowed: off, green, red"
    assert refused(minimal(off="black")) == "off: 'black' is not a colour; allowed: off, green, red"
    assert refused(minimal(on=3)).startswith("on: 3 is not a colour; allowed: ")


def test_on_as_a_list_is_refused_not_a_crash():
    # a bug fixed here: an unhashable value raised TypeError instead of the ValueError
    assert refused(minimal(on=["green"])).startswith("on: ['green'] is not a colour; allowed: ")


@pytest.mark.parametrize("channel", [0, 17, -1, True, 1.0, "9"])
def test_a_channel_outside_1_16_is_refused(channel: object):
    assert refused(minimal(channel=channel)).startswith(f"channel: {channel!r}; allowed: 1..16, or null")


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"colors": {"off": 0}}, "name: None; allowed: "),
        (minimal(name="  "), "name: '  '; allowed: "),
        (minimal(name="x" * 81), "name: "),
        (minimal(port=""), "port: ''; allowed: "),
        (minimal(port=7), "port: 7; allowed: "),
        (["name", "x"], "['name', 'x'] is not a mapping; allowed: "),
    ],
)
def test_bad_name_port_or_top_level_is_refused(data: Any, start: str):
    assert refused(data).startswith(start)


# --------------------------------------------------------------------------- load_profile


@pytest.mark.parametrize("name", ["../x", "devices/apc_mini", "", "CON", "a b", "x.yaml"])
def test_a_path_or_bad_name_is_not_a_profile_name(name: str):
    with pytest.raises(ProfileError, match=r"is not a profile name; allowed: "):
        load_profile(FOLDER, name)


def test_a_missing_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match=r"'nope' does not exist in .*; available: apc_mini, "):
        load_profile(FOLDER, "nope")


def test_yaml_on_and_off_stay_words(tmp_path: Path):
    # a bug fixed here: YAML 1.1 (PyYAML's safe_load) reads bare on/off as true/false, so the
    # documented format (keys on: and off:, a colour named off) could not be loaded at all
    write(tmp_path, "pad", "name: Pad\ncolors:\n  off: 0\n  on: 1\n  yes: 2\non: on\noff: off\n")
    profile = load_profile(tmp_path, "pad")
    assert dict(profile.colors) == {"off": 0, "on": 1, "yes": 2}
    assert (profile.on, profile.off) == (1, 0)


def test_yaml_true_and_false_are_still_booleans(tmp_path: Path):
    write(tmp_path, "pad", "name: Pad\ncolors: {off: 0, red: true}\n")
    with pytest.raises(ProfileError, match=r"^midi device profile 'pad': colors\.red: True; allowed: "):
        load_profile(tmp_path, "pad")


def test_a_bad_file_is_a_profile_error_naming_the_key(tmp_path: Path):
    write(tmp_path, "pad", "name: Pad\ncolors: {off: 0, red: 128}\n")
    with pytest.raises(ProfileError, match=r"^midi device profile 'pad': colors\.red: 128; allowed: "):
        load_profile(tmp_path, "pad")
    write(tmp_path, "pad", "name: Pad\ninit:\n  - [0x00, 0xF7]\n")
    with pytest.raises(ProfileError, match=r"^midi device profile 'pad': init\[0\]: \[0, 247\] "):
        load_profile(tmp_path, "pad")
    write(tmp_path, "pad", "name: Pad\nchannel: 17\n")
    with pytest.raises(ProfileError, match=r"^midi device profile 'pad': channel: 17; allowed: 1\.\.16"):
        load_profile(tmp_path, "pad")


def test_invalid_yaml_and_an_empty_file_are_profile_errors(tmp_path: Path):
    write(tmp_path, "broken", "name: [unclosed\n")
    with pytest.raises(ProfileError, match=r"^midi device profile 'broken' cannot be read: "):
        load_profile(tmp_path, "broken")
    write(tmp_path, "empty", "")
    with pytest.raises(ProfileError, match=r"^midi device profile 'empty': None is not a mapping"):
        load_profile(tmp_path, "empty")


def test_an_oversized_file_is_refused(tmp_path: Path):
    write(tmp_path, "big", "name: Big\n" + "#" * (64 * 1024) + "\n")
    with pytest.raises(ProfileError, match=r"larger than 65536 bytes"):
        load_profile(tmp_path, "big")


def test_profile_names_skips_names_that_are_not_profile_names(tmp_path: Path):
    write(tmp_path, "b_pad", "name: B\n")
    write(tmp_path, "a-pad", "name: A\n")
    write(tmp_path, "not a name", "name: C\n")
    (tmp_path / DEVICES_FOLDER / "notes.txt").write_text("x", encoding="utf-8")
    assert profile_names(tmp_path) == ["a-pad", "b_pad"]
    assert profile_names(tmp_path / "missing") == []
