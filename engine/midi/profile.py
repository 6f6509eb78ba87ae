"""MIDI device profiles: how a controller's LEDs are lit and how it is woken up, in files, not code.

A profile is ``presets/midi/devices/<name>.yaml``, named by a mapping's ``profile:`` key (a plain
name, never a path)::

    name: Akai APC mini (mk1)      # what it is (shown on the page and in logs)
    port: "APC MINI"               # the port name prefix it usually has (a hint for mappings)
    init:                          # SysEx sent on every connect (a mode switch, a template): the
      - [0x00, 0x20, 0x29, 0x02, 0x11, 0x77, 0x08]   # data bytes between F0 and F7, each 0..127
    colors:                        # LED values (note velocity or cc value) by name
      off: 0
      green: 1
      red: 3
    on: green                      # a switch that is on, an action's button at rest: these colours
    off: off
    channel: null                  # 1..16: the LEDs listen on this channel; null: the binding's (else 1)

A binding may name its own lit colour (``color: red``) among the profile's ``colors``. Without a
profile, LEDs take 127 for on and 0 for off (``DEFAULT_PROFILE``).

Profile files are read with YAML 1.2 booleans: only ``true`` and ``false`` are booleans, so the
keys ``on:`` and ``off:`` and a colour named ``off`` stay words (YAML 1.1 reads them as true/false).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.control.scenes import NAME_RULE, is_scene_name

MAX_PROFILE_BYTES = 64 * 1024
MAX_INIT_MESSAGES = 16
MAX_SYSEX_BYTES = 256
PROFILE_KEYS = ("name", "port", "init", "colors", "on", "off", "channel")
DEVICES_FOLDER = "devices"
"""Profiles live in this sub-folder of the mappings' folder (``presets/midi/devices``)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"


class MidiYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: ``on``, ``off``, ``yes`` and ``no`` stay strings (a colour
    named ``off``, a scene named ``no``); mapping and profile files are read with it."""


MidiYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rule) for tag, rule in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
MidiYamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class ProfileError(ValueError):
    """A device profile that cannot be loaded; the message names the key and what is allowed."""


@dataclass(frozen=True)
class DeviceProfile:
    """A checked profile: LED colours (0..127 each), the on/off colours, SysEx sent on connect."""

    name: str
    port: str | None = None
    init: tuple[tuple[int, ...], ...] = ()
    colors: Mapping[str, int] = field(default_factory=lambda: {"off": 0, "on": 127})
    on: int = 127
    off: int = 0
    channel: int | None = None

    def color(self, name: str | None) -> int:
        """The LED value of colour ``name`` (``None``: the profile's ``on``); a ValueError names
        the colours allowed."""
        if name is None:
            return self.on
        if name not in self.colors:
            allowed = ", ".join(self.colors) or "none"
            raise ValueError(f"color {name!r:.40} is not in the profile {self.name!r}; allowed: {allowed}")
        return self.colors[name]


DEFAULT_PROFILE = DeviceProfile("generic (127 on, 0 off)")


def _data_byte(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= 127


def check_profile(data: Any) -> DeviceProfile:
    """``data`` (a profile file's plain YAML data) as a ``DeviceProfile``; a ValueError naming the
    key, the bad value and what is allowed."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{data!r:.60} is not a mapping; allowed: {{{', '.join(PROFILE_KEYS)}}}")
    unknown = [key for key in data if key not in PROFILE_KEYS]
    if unknown:
        hint = " (a bare on/off read as a boolean: quote it)" if isinstance(unknown[0], bool) else ""
        raise ValueError(f"{unknown[0]!s:.40}: unknown key{hint}; allowed: {', '.join(PROFILE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 80:
        raise ValueError(f"name: {name!r:.60}; allowed: the device's name (1 to 80 characters)")
    port = data.get("port")
    if port is not None and (not isinstance(port, str) or not port.strip() or len(port) > 128):
        raise ValueError(f"port: {port!r:.60}; allowed: a port name prefix (1 to 128 characters), or null")
    init_items = data.get("init")
    if init_items is None:
        init_items = []
    if not isinstance(init_items, list) or len(init_items) > MAX_INIT_MESSAGES:
        raise ValueError(
            f"init: {init_items!r:.60}; allowed: a list of at most {MAX_INIT_MESSAGES} SysEx messages"
        )
    init: list[tuple[int, ...]] = []
    for i, message in enumerate(init_items):
        if (
            not isinstance(message, list)
            or not 1 <= len(message) <= MAX_SYSEX_BYTES
            or not all(_data_byte(b) for b in message)
        ):
            raise ValueError(
                f"init[{i}]: {message!r:.60} is not SysEx data; allowed: 1 to {MAX_SYSEX_BYTES} "
                "bytes 0..127 (without F0 and F7)"
            )
        init.append(tuple(message))
    colors = data.get("colors")
    if colors is None:
        colors = dict(DEFAULT_PROFILE.colors)
    if not isinstance(colors, Mapping) or not colors:
        raise ValueError(f"colors: {colors!r:.60}; allowed: a mapping of colour names to values 0..127")
    for key, value in colors.items():
        if not isinstance(key, str) or not is_scene_name(key):
            raise ValueError(f"colors: {key!r:.40} is not a colour name; allowed: {NAME_RULE}")
        if not _data_byte(value):
            raise ValueError(f"colors.{key}: {value!r:.40}; allowed: a value 0..127")
    picked = {}
    for key, default in (
        ("on", max(colors, key=colors.__getitem__)),
        ("off", min(colors, key=colors.__getitem__)),
    ):
        chosen = data.get(key, default)
        if not isinstance(chosen, str) or chosen not in colors:
            raise ValueError(f"{key}: {chosen!r:.40} is not a colour; allowed: {', '.join(colors)}")
        picked[key] = colors[chosen]
    channel = data.get("channel")
    if channel is not None and (
        isinstance(channel, bool) or not isinstance(channel, int) or not 1 <= channel <= 16
    ):
        raise ValueError(f"channel: {channel!r:.40}; allowed: 1..16, or null for the binding's channel")
    return DeviceProfile(name.strip(), port, tuple(init), dict(colors), picked["on"], picked["off"], channel)


def profile_names(folder: str | Path) -> list[str]:
    """The profiles in ``folder`` (the mappings' folder) by name."""
    devices = Path(folder) / DEVICES_FOLDER
    return sorted(p.stem for p in devices.glob("*.yaml") if is_scene_name(p.stem))


def load_profile(folder: str | Path, name: str) -> DeviceProfile:
    """The checked profile ``<folder>/devices/<name>.yaml`` (``folder``: the mappings' folder)."""
    if not is_scene_name(name):
        raise ProfileError(f"{name!r:.60} is not a profile name; allowed: {NAME_RULE}")
    path = Path(folder) / DEVICES_FOLDER / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(profile_names(folder)) or "none"
        raise ProfileError(
            f"midi device profile {name!r} does not exist in {path.parent}; available: {available}"
        )
    if path.stat().st_size > MAX_PROFILE_BYTES:
        raise ProfileError(f"midi device profile {name!r} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=MidiYamlLoader)  # a SafeLoader
        return check_profile(data)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ProfileError(f"midi device profile {name!r} cannot be read: {err}") from err
    except ValueError as err:
        raise ProfileError(f"midi device profile {name!r}: {err}") from None
