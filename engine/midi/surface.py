"""One controller's messages as control commands, by its mapping; and its LEDs from the values.

Pure logic: no ports, no threads, no ControlState. ``Surface.receive`` takes one mido-like message
and gives the ``Command``s to send through the OSC dispatcher (the same validation, ControlState,
echo and autosave as OSC); ``Surface.leds`` gives the messages that show the current values on
the controller. The state kept per binding: 14-bit pairs, soft takeovers, the last value each
binding set (to tell when something else moved its parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine import params
from engine.midi.controls import (
    Curve,
    Pair14,
    SwitchMode,
    Takeover,
    cc_pressed,
    from_range,
    normalise7,
    normalise14,
    note_pressed,
    unshape,
)
from engine.midi.mapping import RELATIVE, Binding, MidiMapping, Role, Source, relative_ticks, role_of
from engine.midi.profile import DEFAULT_PROFILE, DeviceProfile
from engine.modulation.modulator import modulator_index
from engine.params import ParamKind

PITCH_OFFSET = 8192  # a pitch-bend message's pitch is -8192..8191 around the centre
SAME = 1e-6  # two normalised values this close are one value


class MidoMessage(Protocol):
    """What is read of a message (``mido.Message`` has it; absent fields are not read)."""

    type: str
    channel: int


@dataclass(frozen=True)
class Command:
    """A change for the OSC dispatcher: ``target``'s address with ``args``.

    ``key``: commands with the same key coalesce to the newest between two drains (a fast
    fader); ``None``: every one counts, in order (a button, a tap).
    """

    target: str
    args: tuple[Any, ...]
    key: str | None

    @property
    def address(self) -> str:
        return params.REGISTRY[self.target].osc_address


Lookup = Callable[[str], Any]
"""A parameter's current value by registry name (``ControlState.latest``; ``None``: unknown)."""
Led = tuple[str, int, int, int]
"""An LED message: (mido type, channel 0..15, cc / note / 0, value; a pitch bend's pitch)."""


def describe(binding: Binding) -> str:
    """A binding's source as people say it: ``cc 48``, ``cc 1/33 (14-bit)``, ``note 36 ch 10``."""
    if binding.source is Source.CC:
        shown = (
            "cc " + "/".join(str(n) for n in binding.numbers) + (" (14-bit)" if binding.fourteen_bit else "")
        )
    elif binding.source is Source.NOTE:
        shown = f"note {binding.numbers[0]}"
    else:
        shown = "pitch bend" if binding.source is Source.PITCHBEND else "program change"
    return shown if binding.channel is None else f"{shown} ch {binding.channel}"


def _modulator_field(lookup: Lookup, key: Any, name: str) -> Any:
    items = lookup("modulators") or []
    try:
        item = items[modulator_index(items, key)]
    except ValueError:
        return None
    if name == "enabled":
        return bool(item.get("enabled", True))
    value = item.get(name)
    if name == "rate" and isinstance(value, str) and value.endswith("hz"):
        return float(value[:-2])
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def current_value(binding: Binding, lookup: Lookup) -> Any:
    """The value ``binding``'s target has now (a modulator hook: that modulator's field)."""
    if binding.target in ("mod_depth", "mod_rate", "mod_enabled"):
        return _modulator_field(lookup, binding.argument, binding.target.removeprefix("mod_"))
    return lookup(binding.target)


def normalised(binding: Binding, value: Any) -> float | None:
    """Where ``value`` sits on ``binding``'s control travel (0..1, before the curve), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or binding.range is None:
        return None
    low, high = binding.range
    inside = min(max(float(value), min(low, high)), max(low, high))
    return unshape(from_range(inside, low, high), binding.curve or Curve.LINEAR)


class Surface:
    """The live side of one ``MidiMapping``: messages in, commands out (see the module docstring).

    ``lookup`` reads the values a change would start from (``ControlState.latest``). Call
    ``settled()`` after the commands of a drain were written (relative encoders then read the
    state again instead of their own last values).
    """

    def __init__(self, mapping: MidiMapping, lookup: Lookup, now: Callable[[], float]) -> None:
        self.mapping = mapping
        self._lookup = lookup
        self._now = now
        self._pairs: dict[Binding, Pair14] = {}
        self._takeovers: dict[Binding, Takeover] = {}
        self._set_by: dict[Binding, float] = {}  # the normalised value each binding set last
        self._recent: dict[str, Any] = {}  # values set in this drain, by command key

    def replace(self, mapping: MidiMapping) -> None:
        """Play ``mapping`` from now on (after learn or forget); state of unchanged bindings stays."""
        kept = set(mapping.bindings)
        for table in (self._pairs, self._takeovers, self._set_by):
            for binding in [b for b in table if b not in kept]:
                del table[binding]
        self.mapping = mapping

    def settled(self) -> None:
        self._recent.clear()

    # ------------------------------------------------------------------ messages in
    def receive(self, message: Any) -> list[Command]:
        """The commands ``message`` means (none when it is not bound or does nothing)."""
        kind = message.type
        channel = getattr(message, "channel", 0) + 1
        if kind == "control_change":
            binding = self.mapping.find(Source.CC, channel, message.control)
            return [] if binding is None else self._cc(binding, message.control, message.value)
        if kind in ("note_on", "note_off"):
            binding = self.mapping.find(Source.NOTE, channel, message.note)
            if binding is None:
                return []
            pressed = note_pressed(kind == "note_on", message.velocity)
            return self._button(binding, pressed, normalise7(message.velocity))
        if kind == "pitchwheel":
            binding = self.mapping.find(Source.PITCHBEND, channel)
            return (
                [] if binding is None else self._absolute(binding, normalise14(message.pitch + PITCH_OFFSET))
            )
        if kind == "program_change":
            binding = self.mapping.find(Source.PROGRAM, channel)
            return [] if binding is None else self._program(binding, message.program)
        return []

    def _cc(self, binding: Binding, number: int, value: int) -> list[Command]:
        role = role_of(params.REGISTRY[binding.target])
        if role in (Role.SWITCH, Role.ACTION):
            return self._button(binding, cc_pressed(value), None)
        if binding.mode in RELATIVE:
            return self._relative(binding, relative_ticks(binding.mode, value))
        if binding.fourteen_bit:
            pair = self._pairs.setdefault(binding, Pair14(now=self._now))
            msb, _lsb = binding.numbers
            combined = pair.feed_msb(value) if number == msb else pair.feed_lsb(value)
            return [] if combined is None else self._absolute(binding, normalise14(combined))
        return self._absolute(binding, normalise7(value))

    def _absolute(self, binding: Binding, fraction: float) -> list[Command]:
        if binding.takeover is not None:
            takeover = self._takeovers.get(binding)
            now = normalised(binding, current_value(binding, self._lookup))
            if takeover is None:
                takeover = self._takeovers[binding] = Takeover(binding.takeover, now)
            elif now is not None and abs(now - self._set_by.get(binding, -1.0)) > SAME:
                takeover.sync(now)  # moved by something else (OSC, a scene, the page, another control)
            picked = takeover.feed(fraction)
            if picked is None:
                return []
            value = binding.value_at(picked)
            set_at = normalised(binding, value)  # an INT rounds: where its value really sits
            self._set_by[binding] = picked if set_at is None else set_at
            return [self._set(binding, value)]
        return [self._set(binding, binding.value_at(fraction))]

    def _relative(self, binding: Binding, ticks: int) -> list[Command]:
        assert binding.range is not None and binding.step is not None
        key = self._key(binding)
        base = self._recent.get(key, current_value(binding, self._lookup))
        low, high = sorted(binding.range)
        if not isinstance(base, (int, float)) or isinstance(base, bool):
            base = low
        value: float = min(max(base + ticks * binding.step, low), high)
        if params.REGISTRY[binding.target].kind is ParamKind.INT:
            value = round(value)
        return [] if value == base else [self._set(binding, value)]

    def _button(self, binding: Binding, pressed: bool, velocity: float | None) -> list[Command]:
        role = role_of(params.REGISTRY[binding.target])
        if role is Role.NUMBER:  # a note's velocity sets a number on a press
            return self._absolute(binding, velocity) if pressed and velocity is not None else []
        if role is Role.SWITCH:
            key = self._key(binding)
            current = bool(self._recent.get(key, current_value(binding, self._lookup)))
            new = SwitchMode(binding.mode.value).feed(pressed, current)
            return [] if new is None else [self._set(binding, new)]
        if binding.target == "mod_trigger" and binding.source is Source.NOTE and not pressed:
            return [Command("mod_release", (binding.argument,), None)]  # a held note holds the envelope
        if not pressed:
            return []
        args = () if binding.argument is None else (binding.argument,)
        return [Command(binding.target, args, None)]

    def _program(self, binding: Binding, program: int) -> list[Command]:
        if binding.target == "preset_load":
            scenes = binding.argument
            assert isinstance(scenes, tuple)
            return [Command("preset_load", (scenes[program],), None)] if program < len(scenes) else []
        return [Command(binding.target, (program,), None)]

    def _key(self, binding: Binding) -> str:
        return binding.target if binding.argument is None else f"{binding.target}:{binding.argument}"

    def _set(self, binding: Binding, value: Any) -> Command:
        key = self._key(binding)
        self._recent[key] = value
        spec = params.REGISTRY[binding.target]
        if spec.kind is ParamKind.ACTION:  # a modulator hook: (modulator, value)
            return Command(binding.target, (binding.argument, value), key)
        if spec.kind is ParamKind.BOOL:
            return Command(binding.target, (bool(value),), key)
        return Command(binding.target, (value,), key)

    # ------------------------------------------------------------------ LEDs out
    def leds(
        self,
        values: Mapping[str, Any],
        profile: DeviceProfile = DEFAULT_PROFILE,
        extra: Mapping[str, Any] = {},
    ) -> dict[tuple[str, int, int], int]:
        """What every binding's LED (or motor fader, or ring) should show for ``values`` (the
        applied values; ``extra``: ``sequence_step``, ``scene``): ``{(type, channel, number):
        value}``; type ``control_change`` / ``note_on`` / ``pitchwheel``."""
        out: dict[tuple[str, int, int], int] = {}
        lookup = values.get
        for binding in self.mapping.bindings:
            if binding.source is Source.PROGRAM:
                continue
            channel = (profile.channel or binding.channel or 1) - 1
            role = role_of(params.REGISTRY[binding.target])
            if role in (Role.SWITCH, Role.ACTION):
                lit = self._lit(binding, role, lookup, extra)
                value = profile.color(binding.color) if lit else profile.off
                kind = "note_on" if binding.source is Source.NOTE else "control_change"
                out[(kind, channel, binding.numbers[0])] = value
                continue
            fraction = self._fraction(binding, role, current_value(binding, lookup))
            if fraction is None or binding.source is Source.NOTE:
                continue
            if binding.source is Source.PITCHBEND:
                out[("pitchwheel", channel, 0)] = round(fraction * 16383) - PITCH_OFFSET
            elif binding.fourteen_bit:
                combined = round(fraction * 16383)
                out[("control_change", channel, binding.numbers[0])] = combined >> 7
                out[("control_change", channel, binding.numbers[1])] = combined & 0x7F
            else:
                out[("control_change", channel, binding.numbers[0])] = round(fraction * 127)
        return out

    @staticmethod
    def _fraction(binding: Binding, role: Role | None, value: Any) -> float | None:
        if role is Role.CHOICE:
            choices = params.REGISTRY[binding.target].choices
            return (choices.index(value) + 0.5) / len(choices) if value in choices else None
        fraction = normalised(binding, value)
        return None if fraction is None or math.isnan(fraction) else fraction

    @staticmethod
    def _lit(binding: Binding, role: Role, lookup: Lookup, extra: Mapping[str, Any]) -> bool:
        if role is Role.SWITCH:
            return bool(current_value(binding, lookup))
        if binding.target == "sequence_jump":
            return bool(extra.get("sequence_step") == binding.argument)
        if binding.target == "preset_load":
            return bool(extra.get("scene") == binding.argument)
        return False
