"""MIDI mapping files: which controller messages play which live parameters, checked at load.

A mapping is a YAML file ``presets/midi/<name>.yaml`` (one per show or device), loaded by its
name only (``load_mapping(folder, name)``; the scene NAME rule, never a path)::

    input: "APC mini"          # input port name prefix (ALSA adds client:port numbers)
    output: "APC mini"         # optional: feedback port prefix (default: the input's)
    profile: null              # optional: a device profile file name (LED velocities, SysEx)
    bindings:
      - {cc: 48, to: guidance_scale, range: [0.0, 5.0], curve: linear}
      - {cc: [1, 33], to: delta}                       # a 14-bit MSB/LSB pair
      - {cc: 16, to: seed, mode: relative_twos, step: 1}
      - {note: 36, to: bypass, mode: toggle}
      - {note: 40, to: preset_load, scene: intro}
      - {program: true, to: preset_load, scenes: [intro, verse, drop]}

Each binding has exactly one **source**:

- ``cc: N`` (0..127, 7-bit) or ``cc: [msb, lsb]`` (a 14-bit pair: two distinct numbers,
  conventionally lsb = msb + 32);
- ``note: N`` (0..127; note on and note off);
- ``pitchbend: true`` (14-bit);
- ``program: true`` (program change n).

``channel: 1..16`` limits it to one channel (omitted: any channel; a channel-specific binding
wins over an any-channel one on the same source). Two bindings on the same source and channel are
refused. ``to`` names a live parameter of the registry (``engine.params.REGISTRY``); its kind
says what it is and which modes it takes:

- a **number** (FLOAT, INT; and the modulator hooks ``mod_depth``, ``mod_rate``): ``absolute``
  (default; from a cc, a 14-bit pair, pitch bend or a note's velocity) or a relative encoder on a
  single cc: ``relative_twos`` (two's complement: 1..63 up, 127..65 down), ``relative_offset``
  (binary offset: 64 is no change), ``relative_sign`` (sign-magnitude: bit 6 set is down);
- a **choice** (ENUM): ``absolute`` from a cc, a 14-bit pair or pitch bend; the travel is cut
  into equal slices, one per choice, in the registry's order;
- a **switch** (BOOL): ``toggle`` (default; flips on note on or a cc at 64 or above) or
  ``momentary`` (on while held) from a note or a single cc;
- an **action** (ACTION): ``trigger`` (the only mode) from a note or a single cc (at 64 or
  above). Some actions take an argument: ``preset_load`` / ``preset_save`` need ``scene`` (a scene
  name); a program change to ``preset_load`` needs ``scenes`` (program n loads ``scenes[n]``);
  ``mod_depth``, ``mod_rate``, ``mod_enabled``, ``mod_trigger``, ``mod_release`` and
  ``mod_remove`` need ``modulator`` (an index or a name); ``sequence_jump`` needs ``step`` (the step
  number), except from a program change (program n jumps to step n). A ``mod_trigger`` on a note
  fires the envelope on note on and releases it on note off. Switches and actions may name the
  ``color`` their LED takes when lit (a colour of the device profile). Actions that take text
  (``mod_add``) or a value of their own (``resolume_tempo``), lists, blends, text and structured
  parameters are refused.

For numbers, ``range: [low, high]`` lies within the parameter's registry range (default: all
of it; low > high inverts; the hooks ``mod_depth`` and ``mod_rate``, which have no registry
range, need one: depth in the target's units, rate in Hz). An absolute number also takes
``curve: linear | exp | log`` (default linear; exp starts slow, log starts fast) and, from a cc,
a pair or pitch bend, ``takeover: pickup | jump | scale`` (default pickup: the control does
nothing until it passes the current value). A relative encoder takes ``step``, the change per
tick in the parameter's units (default: 1 for an INT, 1/127 of the range for a FLOAT).

``check_mapping(data)`` checks plain data (a ``ValueError`` naming the key path, e.g.
``bindings[2].to: 'brightness' is not a live parameter; allowed: ...``); ``load_mapping`` reads the
file (at most ``MAX_MAPPING_BYTES``) and raises ``MappingError``. Neither opens a MIDI port.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from engine import params
from engine.control.scenes import NAME_RULE, is_scene_name
from engine.midi.controls import Curve, RelativeEncoding, decode_relative, shape, to_range
from engine.midi.controls import TakeoverMode as Takeover
from engine.midi.profile import MidiYamlLoader
from engine.modulation.modulator import MAX_MODULATORS
from engine.modulation.rate import MAX_HZ, MAX_PERIOD
from engine.modulation.sequence import MAX_STEPS
from engine.params import ParamKind, ParamSpec

MAX_MAPPING_BYTES = 256 * 1024
MAX_BINDINGS = 1024
MAX_PORT_CHARS = 128
MODULATOR_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class MappingError(ValueError):
    """A MIDI mapping file that cannot be loaded; the message says why and what is allowed."""


class Source(str, Enum):
    """What kind of MIDI message a binding listens to."""

    CC = "cc"
    NOTE = "note"
    PITCHBEND = "pitchbend"
    PROGRAM = "program"


class Mode(str, Enum):
    """How a message's value becomes the parameter's value."""

    ABSOLUTE = "absolute"
    RELATIVE_TWOS = "relative_twos"
    RELATIVE_OFFSET = "relative_offset"
    RELATIVE_SIGN = "relative_sign"
    TOGGLE = "toggle"
    MOMENTARY = "momentary"
    TRIGGER = "trigger"


class Role(str, Enum):
    """What a target is to a controller, from its registry kind."""

    NUMBER = "a number"
    CHOICE = "a choice"
    SWITCH = "a switch"
    ACTION = "an action"


RELATIVE_ENCODINGS = {
    Mode.RELATIVE_TWOS: RelativeEncoding.TWOS_COMPLEMENT,
    Mode.RELATIVE_OFFSET: RelativeEncoding.BINARY_OFFSET,
    Mode.RELATIVE_SIGN: RelativeEncoding.SIGN_MAGNITUDE,
}
"""A relative mode's encoding (``engine.midi.controls`` decodes it)."""
RELATIVE = frozenset(RELATIVE_ENCODINGS)
MODES_OF: dict[Role, tuple[Mode, ...]] = {
    Role.NUMBER: (Mode.ABSOLUTE, Mode.RELATIVE_TWOS, Mode.RELATIVE_OFFSET, Mode.RELATIVE_SIGN),
    Role.CHOICE: (Mode.ABSOLUTE,),
    Role.SWITCH: (Mode.TOGGLE, Mode.MOMENTARY),
    Role.ACTION: (Mode.TRIGGER,),
}
SOURCES_OF: dict[Role, tuple[Source, ...]] = {
    Role.NUMBER: (Source.CC, Source.NOTE, Source.PITCHBEND),
    Role.CHOICE: (Source.CC, Source.PITCHBEND),
    Role.SWITCH: (Source.CC, Source.NOTE),
    Role.ACTION: (Source.CC, Source.NOTE),
}
ACTION_ARGUMENTS: dict[str, tuple[str | None, Role]] = {
    "preset_load": ("scene", Role.ACTION),
    "preset_save": ("scene", Role.ACTION),
    "mod_depth": ("modulator", Role.NUMBER),
    "mod_rate": ("modulator", Role.NUMBER),
    "mod_enabled": ("modulator", Role.SWITCH),
    "mod_trigger": ("modulator", Role.ACTION),
    "mod_release": ("modulator", Role.ACTION),
    "mod_remove": ("modulator", Role.ACTION),
    "sequence_jump": ("step", Role.ACTION),
}
"""Actions with an argument in the mapping, and what they are to a controller. Other actions are
bindable as plain triggers when they take no value over OSC (``osc_args`` ``''`` or ``'[i]'``)."""
NOT_FROM_MIDI = frozenset({"status", "midi_learn", "midi_forget", "midi_unbind", "midi_cancel"})
"""Actions a control cannot play: ``/status`` answers only its sender; a learn would bind the very
pad meant to cancel it."""
PROGRAM_TARGETS = {"preset_load": "scenes", "sequence_jump": None}
"""What a program change may drive: program n loads ``scenes[n]`` / jumps to step n."""
HOOK_LIMITS: dict[str, tuple[float, float] | None] = {
    "mod_depth": None,
    "mod_rate": (1.0 / MAX_PERIOD, MAX_HZ),
}
"""Number actions without a registry range: they need ``range`` (``None``: any finite numbers)."""
TRIGGER_ARGS = ("", "[i]")
BINDING_KEYS = (
    "cc",
    "note",
    "pitchbend",
    "program",
    "channel",
    "to",
    "mode",
    "range",
    "curve",
    "takeover",
    "step",
    "scene",
    "scenes",
    "modulator",
    "color",
)
TOP_KEYS = ("input", "output", "profile", "bindings")
SOURCE_KEYS = tuple(source.value for source in Source)


@dataclass(frozen=True)
class Binding:
    """One checked binding.

    Attributes:
        source: the message kind it listens to.
        numbers: ``(cc,)``, ``(msb, lsb)`` for a 14-bit pair, ``(note,)``; ``()`` for pitch bend
            and program change.
        channel: 1..16, or ``None`` for any channel.
        target: the registry name it drives.
        mode: how the value maps (see the module docstring).
        range: ``(low, high)`` for numbers (low > high: inverted), else ``None``.
        curve: for absolute numbers, else ``None``.
        takeover: for absolute numbers from a cc, a pair or pitch bend, else ``None``.
        step: the change per tick of a relative encoder, else ``None``.
        argument: the action's argument: a scene name, a tuple of scene names (program change),
            a modulator index or name, a sequence step number; else ``None``.
        color: a switch's or an action's LED colour when lit (a colour name of the mapping's
            device profile, checked when the profile is loaded), else ``None`` (the profile's on).
    """

    source: Source
    numbers: tuple[int, ...]
    channel: int | None
    target: str
    mode: Mode
    range: tuple[float, float] | None = None
    curve: Curve | None = None
    takeover: Takeover | None = None
    step: float | None = None
    argument: str | int | tuple[str, ...] | None = None
    color: str | None = None

    @property
    def fourteen_bit(self) -> bool:
        return self.source is Source.PITCHBEND or len(self.numbers) == 2

    def value_at(self, fraction: float) -> float | int | str:
        """The value an absolute binding sets at ``fraction`` of the control's travel (0..1:
        cc / 127, a pair / 16383, (bend + 8192) / 16383, velocity / 127)."""
        if self.mode is not Mode.ABSOLUTE:
            raise ValueError(f"{self.target}: value_at needs an absolute binding, not {self.mode.value}")
        x = min(max(float(fraction), 0.0), 1.0)
        spec = params.REGISTRY[self.target]
        if spec.kind is ParamKind.ENUM:
            return spec.choices[min(int(x * len(spec.choices)), len(spec.choices) - 1)]
        assert self.range is not None
        low, high = self.range
        value = to_range(shape(x, self.curve or Curve.LINEAR), low, high)
        return round(value) if spec.kind is ParamKind.INT else value


def relative_ticks(mode: Mode, raw: int) -> int:
    """The signed ticks a relative encoder's 7-bit value means in ``mode``."""
    encoding = RELATIVE_ENCODINGS.get(mode)
    if encoding is None:
        allowed = _join(sorted(m.value for m in RELATIVE))
        raise ValueError(f"{mode.value!r} is not a relative mode; allowed: {allowed}")
    return decode_relative(raw, encoding)


@dataclass(frozen=True)
class MidiMapping:
    """A checked mapping: ports, an optional device profile and the bindings, indexed once."""

    input: str
    output: str
    profile: str | None
    bindings: tuple[Binding, ...]
    _index: dict[tuple[Source, int | None, int | None], Binding] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        index: dict[tuple[Source, int | None, int | None], Binding] = {}
        for binding in self.bindings:
            for key in _keys(binding.source, binding.channel, binding.numbers):
                index.setdefault(key, binding)
        object.__setattr__(self, "_index", index)

    def find(self, kind: Source | str, channel: int, number: int | None = None) -> Binding | None:
        """The binding of a message (``channel`` 1..16; ``number`` the cc or note, ``None`` for
        pitch bend and program change): one on that channel first, else one on any channel. Both
        halves of a 14-bit pair find their binding."""
        source = Source(kind)
        number = None if source in (Source.PITCHBEND, Source.PROGRAM) else number
        return self._index.get((source, channel, number)) or self._index.get((source, None, number))


def _keys(
    source: Source, channel: int | None, numbers: tuple[int, ...]
) -> list[tuple[Source, int | None, int | None]]:
    return [(source, channel, n) for n in numbers] if numbers else [(source, channel, None)]


def _join(items: Sequence[str], sep: str = ", ") -> str:
    return sep.join(items)


def role_of(spec: ParamSpec) -> Role | None:
    """What ``spec`` is to a controller; ``None``: it cannot be played from MIDI."""
    if spec.kind in (ParamKind.FLOAT, ParamKind.INT):
        return Role.NUMBER
    if spec.kind is ParamKind.ENUM:
        return Role.CHOICE
    if spec.kind is ParamKind.BOOL:
        return Role.SWITCH
    if spec.kind is ParamKind.ACTION:
        if spec.name in NOT_FROM_MIDI:
            return None
        if spec.name in ACTION_ARGUMENTS:
            return ACTION_ARGUMENTS[spec.name][1]
        return Role.ACTION if spec.osc_args in TRIGGER_ARGS else None
    return None


def bindable() -> list[str]:
    """Every registry name a binding may target: numbers, choices, switches, then actions (each in
    registry order)."""
    return [spec.name for role in Role for spec in params.REGISTRY.values() if role_of(spec) is role]


def _example(role: Role) -> str:
    return next(spec.name for spec in params.REGISTRY.values() if role_of(spec) is role)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return _number(value) and float(value).is_integer() and low <= value <= high


def _port(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PORT_CHARS:
        raise ValueError(
            f"{where}: {value!r:.60} is not a port name; allowed: the start of a MIDI port's name "
            f"(1 to {MAX_PORT_CHARS} characters)"
        )
    if any(not char.isprintable() for char in value):
        raise ValueError(f"{where}: {value!r:.60} has control characters; allowed: printable text")
    return value


def check_mapping(data: Any) -> MidiMapping:
    """``data`` (a file's plain YAML data) as a ``MidiMapping``; a ValueError naming the key path,
    the bad value and what is allowed."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{data!r:.60} is not a mapping; allowed: {{{_join(TOP_KEYS)}}}")
    unknown = [str(key) for key in data if key not in TOP_KEYS]
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; allowed: {_join(TOP_KEYS)}")
    if "input" not in data:
        raise ValueError("input: missing; allowed: the start of a MIDI input port's name")
    port_in = _port(data["input"], "input")
    port_out = port_in if data.get("output") is None else _port(data["output"], "output")
    profile = data.get("profile")
    if profile is not None and not is_scene_name(profile):
        raise ValueError(f"profile: {profile!r:.60} is not a profile name; allowed: {NAME_RULE}, or null")
    items = data.get("bindings")
    items = [] if items is None else items
    if not isinstance(items, list):
        raise ValueError(f"bindings: {items!r:.60} is not a list; allowed: a list of bindings, [] for none")
    if len(items) > MAX_BINDINGS:
        raise ValueError(f"bindings: {len(items)} given; allowed: at most {MAX_BINDINGS}")
    bindings: list[Binding] = []
    taken: dict[tuple[Source, int | None, int | None], int] = {}
    for index, item in enumerate(items):
        where = f"bindings[{index}]"
        binding = check_binding(item, where)
        for key in _keys(binding.source, binding.channel, binding.numbers):
            if key in taken:
                first = taken[key]
                shown = binding.source.value if key[2] is None else f"{binding.source.value} {key[2]}"
                on = "any channel" if key[1] is None else f"channel {key[1]}"
                raise ValueError(
                    f"{where}.{binding.source.value}: {shown} on {on} is already bound by "
                    f"bindings[{first}] ({bindings[first].target}); "
                    "allowed: one binding per source and channel"
                )
            taken[key] = index
        bindings.append(binding)
    return MidiMapping(port_in, port_out, profile, tuple(bindings))


def _source(item: Mapping[str, Any], where: str) -> tuple[Source, tuple[int, ...]]:
    given = [key for key in SOURCE_KEYS if key in item]
    allowed = "exactly one of cc | note | pitchbend | program"
    if not given:
        raise ValueError(f"{where}: no source; allowed: {allowed}")
    if len(given) > 1:
        raise ValueError(f"{where}: {len(given)} sources ({_join(given)}); allowed: {allowed}")
    source = Source(given[0])
    value = item[source.value]
    path = f"{where}.{source.value}"
    if source is Source.CC:
        if _whole(value, 0, 127):
            return source, (int(value),)
        if isinstance(value, list) and len(value) == 2 and all(_whole(v, 0, 127) for v in value):
            if value[0] == value[1]:
                raise ValueError(
                    f"{path}: {value} names one cc twice; allowed: two distinct numbers [msb, lsb]"
                )
            return source, (int(value[0]), int(value[1]))
        raise ValueError(f"{path}: {value!r:.60} is not a cc; allowed: 0..127, or [msb, lsb] for 14 bits")
    if source is Source.NOTE:
        if not _whole(value, 0, 127):
            raise ValueError(f"{path}: {value!r:.60} is not a note number; allowed: 0..127")
        return source, (int(value),)
    if value is not True:
        raise ValueError(f"{path}: {value!r:.60}; allowed: true")
    return source, ()


def _choose(value: Any, path: str, allowed: Sequence[Any]) -> Any:
    member = next((m for m in allowed if m.value == value), None)
    if member is None:
        raise ValueError(
            f"{path}: {value!r:.60} is not allowed here; allowed: {_join([m.value for m in allowed], ' | ')}"
        )
    return member


def check_binding(item: Any, where: str = "binding") -> Binding:
    """One binding's plain data as a ``Binding`` (without the duplicate check of the list)."""
    if not isinstance(item, Mapping):
        raise ValueError(
            f"{where}: {item!r:.60} is not a mapping; allowed: {{cc | note | pitchbend | program, to, ...}}"
        )
    unknown = [str(key) for key in item if key not in BINDING_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; allowed: {_join(BINDING_KEYS)}")
    source, numbers = _source(item, where)
    channel = item.get("channel")
    if channel is not None and not _whole(channel, 1, 16):
        raise ValueError(
            f"{where}.channel: {channel!r:.60} is not a channel; allowed: 1..16, or omitted for any"
        )
    channel = None if channel is None else int(channel)

    given = item.get("to")
    spec = params.REGISTRY.get(given) if isinstance(given, str) else None
    if spec is None:
        raise ValueError(f"{where}.to: {given!r:.60} is not a live parameter; allowed: {_join(bindable())}")
    name = spec.name
    role = role_of(spec)
    if role is None:
        if spec.kind is not ParamKind.ACTION:
            what = f"a {spec.kind.value} parameter"
        elif name in NOT_FROM_MIDI:
            what = "an action for OSC and the page only"
        else:
            what = "an action that takes a value"
        raise ValueError(
            f"{where}.to: {name} is {what} and cannot be played from MIDI; allowed: {_join(bindable())}"
        )

    if source is Source.PROGRAM:
        if name not in PROGRAM_TARGETS:
            raise ValueError(
                f"{where}.program: a program change cannot drive {name}; allowed: "
                f"{_join(list(PROGRAM_TARGETS), ' | ')}"
            )
    elif source not in SOURCES_OF[role]:
        raise ValueError(
            f"{where}.{source.value}: {source.value} cannot drive {name} ({role.value}); "
            f"allowed: {_join([s.value for s in SOURCES_OF[role]], ' | ')}"
        )

    mode = _mode(item, where, source, numbers, name, role)
    range_, curve, takeover, step = _shape(item, where, source, spec, role, mode)
    argument = _argument(item, where, source, name)
    if mode in RELATIVE and step is None:
        assert range_ is not None
        step = 1.0 if spec.kind is ParamKind.INT else abs(range_[1] - range_[0]) / 127.0
    color = item.get("color")
    if color is not None:
        if role not in (Role.SWITCH, Role.ACTION):
            raise ValueError(
                f"{where}.color: not used with {name} ({role.value}); allowed: only for switches and actions"
            )
        if not is_scene_name(color):
            raise ValueError(f"{where}.color: {color!r:.40} is not a colour name; allowed: {NAME_RULE}")
    return Binding(source, numbers, channel, name, mode, range_, curve, takeover, step, argument, color)


def _mode(
    item: Mapping[str, Any], where: str, source: Source, numbers: tuple[int, ...], name: str, role: Role
) -> Mode:
    allowed = MODES_OF[role]
    if "mode" not in item:
        return allowed[0]
    value = item["mode"]
    mode = next((m for m in Mode if m.value == value), None)
    if mode is None:
        raise ValueError(
            f"{where}.mode: {value!r:.60} is not a mode; allowed: {_join([m.value for m in allowed], ' | ')}"
        )
    if mode not in allowed:
        needs = next(r for r in MODES_OF if mode in MODES_OF[r])
        raise ValueError(
            f"{where}.mode: {mode.value!r} needs {needs.value} parameter "
            f"({_example(needs)} is ok, {name} is {role.value}); "
            f"allowed: {_join([m.value for m in allowed], ' | ')}"
        )
    if mode in RELATIVE and (source is not Source.CC or len(numbers) != 1):
        raise ValueError(
            f"{where}.mode: {mode.value!r} needs a single cc (an endless encoder); allowed: absolute"
        )
    return mode


def _shape(
    item: Mapping[str, Any], where: str, source: Source, spec: ParamSpec, role: Role, mode: Mode
) -> tuple[tuple[float, float] | None, Curve | None, Takeover | None, float | None]:
    name = spec.name
    number = role is Role.NUMBER
    absolute = number and mode is Mode.ABSOLUTE
    for key, ok, where_ok in (
        ("range", number, "number parameters"),
        ("curve", absolute, "absolute number bindings"),
        (
            "takeover",
            absolute and source is not Source.NOTE,
            "absolute number bindings from a cc or pitch bend",
        ),
        (
            "step",
            (number and mode in RELATIVE) or (name == "sequence_jump" and source is not Source.PROGRAM),
            "relative modes, and sequence_jump from a cc or a note",
        ),
    ):
        if key in item and not ok:
            raise ValueError(
                f"{where}.{key}: not used with {name} ({role.value}, {mode.value}); "
                f"allowed: only for {where_ok}"
            )
    if not number:
        return None, None, None, None
    limits: tuple[float, float] | None
    if name in HOOK_LIMITS:
        limits = HOOK_LIMITS[name]
        if "range" not in item:
            units = "Hz" if name == "mod_rate" else "the target's units"
            raise ValueError(f"{where}.range: missing; allowed: [low, high] for {name} (in {units})")
    else:
        assert spec.minimum is not None and spec.maximum is not None
        limits = (spec.minimum, spec.maximum)
    range_ = limits if "range" not in item else _range(item["range"], f"{where}.range", spec, limits)
    assert range_ is not None
    curve = takeover = None
    if absolute:
        curve = _choose(item.get("curve", Curve.LINEAR.value), f"{where}.curve", list(Curve))
        if source is not Source.NOTE:
            takeover = _choose(
                item.get("takeover", Takeover.PICKUP.value), f"{where}.takeover", list(Takeover)
            )
    step = None
    if mode in RELATIVE and "step" in item:
        value = item["step"]
        integer = spec.kind is ParamKind.INT
        if not _number(value) or value <= 0 or (integer and not float(value).is_integer()):
            kind = "a whole number" if integer else "a number"
            raise ValueError(
                f"{where}.step: {value!r:.60} is not allowed; "
                f"allowed: {kind} > 0 (per tick, in {name}'s units)"
            )
        step = float(value)
    return (float(range_[0]), float(range_[1])), curve, takeover, step


def _range(
    value: Any, where: str, spec: ParamSpec, limits: tuple[float, float] | None
) -> tuple[float, float]:
    within = "any two finite numbers" if limits is None else f"within [{_fmt(limits[0])}, {_fmt(limits[1])}]"
    if not isinstance(value, list) or len(value) != 2 or not all(_number(v) for v in value):
        raise ValueError(f"{where}: {value!r:.60} is not [low, high]; allowed: two numbers {within}")
    low, high = float(value[0]), float(value[1])
    if low == high:
        raise ValueError(
            f"{where}: {value} is empty; allowed: two different numbers {within} (low > high inverts)"
        )
    if spec.kind is ParamKind.INT and not (low.is_integer() and high.is_integer()):
        raise ValueError(f"{where}: {value} is not whole numbers; allowed: two integers {within}")
    if limits is not None and not all(limits[0] <= v <= limits[1] for v in (low, high)):
        raise ValueError(f"{where}: {value} is outside {spec.name}'s range; allowed: {within}")
    return low, high


def _argument(
    item: Mapping[str, Any], where: str, source: Source, name: str
) -> str | int | tuple[str, ...] | None:
    wanted = ACTION_ARGUMENTS.get(name, (None, Role.ACTION))[0]
    if source is Source.PROGRAM:
        wanted = PROGRAM_TARGETS[name]
    for key in ("scene", "scenes", "modulator"):
        if key in item and key != wanted:
            allowed = f"{wanted} for {name}" if wanted else f"nothing for {name} from {source.value}"
            raise ValueError(f"{where}.{key}: not used here; allowed: {allowed}")
    if wanted is None:
        return None
    if wanted not in item:
        what = {
            "scene": f"a scene name ({NAME_RULE})",
            "scenes": "a list of scene names (program n loads scenes[n])",
            "modulator": f"a modulator index 0..{MAX_MODULATORS - 1} or name",
            "step": f"a sequence step number 0..{MAX_STEPS - 1}",
        }[wanted]
        raise ValueError(f"{where}: {name} needs {wanted!r}; allowed: {what}")
    value = item[wanted]
    path = f"{where}.{wanted}"
    if wanted == "scene":
        if not is_scene_name(value):
            raise ValueError(f"{path}: {value!r:.60} is not a scene name; allowed: {NAME_RULE}")
        return str(value)
    if wanted == "scenes":
        if not isinstance(value, list) or not 1 <= len(value) <= 128:
            raise ValueError(f"{path}: {value!r:.60} is not a list of scenes; allowed: 1 to 128 scene names")
        for i, scene in enumerate(value):
            if not is_scene_name(scene):
                raise ValueError(f"{path}[{i}]: {scene!r:.60} is not a scene name; allowed: {NAME_RULE}")
        return tuple(value)
    if wanted == "modulator":
        if _whole(value, 0, MAX_MODULATORS - 1):
            return int(value)
        if isinstance(value, str) and 1 <= len(value) <= 32 and set(value) <= MODULATOR_NAME_CHARS:
            return value
        raise ValueError(
            f"{path}: {value!r:.60} is not a modulator; allowed: an index 0..{MAX_MODULATORS - 1} or a name "
            "(1 to 32 letters, digits, '_' or '-')"
        )
    if not _whole(value, 0, MAX_STEPS - 1):
        raise ValueError(f"{path}: {value!r:.60} is not a step number; allowed: 0..{MAX_STEPS - 1}")
    return int(value)


def mapping_names(folder: str | Path) -> list[str]:
    """The mapping files in ``folder`` by name (``NAME.yaml`` with a valid name)."""
    return sorted(p.stem for p in Path(folder).glob("*.yaml") if is_scene_name(p.stem))


def load_mapping(folder: str | Path, name: str) -> MidiMapping:
    """The checked mapping ``<folder>/<name>.yaml``; ``name`` is a plain name, never a path."""
    if not is_scene_name(name):
        raise MappingError(f"{name!r:.60} is not a mapping name; allowed: {NAME_RULE}")
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        available = _join(mapping_names(folder)) or "none"
        raise MappingError(f"midi mapping {name!r} does not exist in {folder}; available: {available}")
    if path.stat().st_size > MAX_MAPPING_BYTES:
        raise MappingError(f"midi mapping {name!r} is larger than {MAX_MAPPING_BYTES} bytes")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=MidiYamlLoader)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise MappingError(f"midi mapping {name!r} cannot be read: {err}") from err
    try:
        return check_mapping(data)
    except ValueError as err:
        raise MappingError(f"midi mapping {name!r}: {err}") from None
