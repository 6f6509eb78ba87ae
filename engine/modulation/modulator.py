"""Modulator specs (YAML / OSC) and ``Modulation``: base + modulations, once per frame, clamped."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.modulation.envelope import Envelope, TimeUnit
from engine.modulation.follower import Band, smoothing_coefficient
from engine.modulation.lfo import Lfo
from engine.modulation.rate import Rate, parse_rate
from engine.modulation.shapes import Shape
from engine.modulation.targets import Target, parse_target

log = logging.getLogger(__name__)

MAX_MODULATORS = 32
MAX_SEED = 2**31 - 1


class ModulatorKind(str, Enum):
    """What drives a modulator."""

    LFO = "lfo"
    ENVELOPE = "envelope"
    AUDIO = "audio"


class ModulatorSpec(BaseModel):
    """One modulator as configured in YAML or sent over OSC.

    The offset it adds is ``depth × source``, in the target's units: an LFO's source is its
    shape in [-1, 1], an envelope's its level in [0, 1], an audio follower's ``min(1, gain ×
    level)`` in [0, 1].

    Attributes:
        target: ``guidance_scale``, ``controlnet_scales[0]``, ``prompt_blend[1]`` (a weight), ...
        kind: lfo | envelope | audio.
        name: an optional handle (``/mod/<name>/trigger``); modulators are otherwise numbered.
        shape, rate, phase, seed: the LFO (phase in cycles, [0, 1)); an envelope's ``rate``, when
            given, fires it at the start of every period (beat-fired).
        depth: the peak offset, in the target's units (negative inverts).
        attack, decay, sustain, release, hold, time_unit: the envelope (times in ``time_unit``;
            ``hold`` makes it a one-shot); ``attack`` / ``release`` (seconds) also smooth audio.
        band, gain: the audio follower's band and gain.
        enabled: off keeps the spec but adds nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_enum_values=False)

    target: str
    kind: ModulatorKind = ModulatorKind.LFO
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,32}$")
    shape: Shape = Shape.SINE
    rate: str | None = None
    depth: float = 0.1
    phase: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    attack: float = Field(default=0.01, ge=0.0, le=3600.0)
    decay: float = Field(default=0.1, ge=0.0, le=3600.0)
    sustain: float = Field(default=1.0, ge=0.0, le=1.0)
    release: float = Field(default=0.2, ge=0.0, le=3600.0)
    hold: float | None = Field(default=None, ge=0.0, le=3600.0)
    time_unit: TimeUnit = TimeUnit.SECONDS
    band: Band = Band.RMS
    gain: float = Field(default=1.0, ge=0.0, le=1000.0)
    enabled: bool = True

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        return str(parse_target(value))

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_text(cls, value: Any) -> Any:
        return None if value is None else str(parse_rate(value))

    @model_validator(mode="before")
    @classmethod
    def _lfo_rate(cls, data: Any) -> Any:
        """An LFO without a rate cycles once a bar."""
        if (
            isinstance(data, dict)
            and data.get("rate") is None
            and data.get("kind", "lfo") in ("lfo", ModulatorKind.LFO)
        ):
            return {**data, "rate": "1bar"}
        return data

    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target)

    @property
    def parsed_rate(self) -> Rate | None:
        return None if self.rate is None else parse_rate(self.rate)


class AudioLevels(Protocol):
    """What audio modulators read: the follower's unsmoothed level of a band (before gain)."""

    def instant(self, band: Band) -> float: ...


class _Source(Protocol):
    def offset(self, seconds: float, beats: float, beats_per_bar: float) -> float: ...


class _LfoSource:
    def __init__(self, spec: ModulatorSpec) -> None:
        rate = spec.parsed_rate
        assert rate is not None
        self.lfo = Lfo(spec.shape, rate, spec.depth, spec.phase, spec.seed)

    def offset(self, seconds: float, beats: float, beats_per_bar: float) -> float:
        return self.lfo.sample(seconds, beats, beats_per_bar)


class _EnvelopeSource:
    def __init__(self, spec: ModulatorSpec) -> None:
        self.envelope = Envelope(
            spec.attack, spec.decay, spec.sustain, spec.release, spec.time_unit, spec.hold
        )
        self.depth = spec.depth
        self.every = spec.parsed_rate
        self.period: int | None = None  # the period of ``every`` seen last

    def offset(self, seconds: float, beats: float, beats_per_bar: float) -> float:
        t = self.envelope.unit.pick(seconds, beats)
        if self.every is not None:
            cycles = self.every.cycles(seconds, beats, beats_per_bar)
            period = math.floor(cycles)
            # Fires when a new period starts; the first frame fires only on a boundary itself,
            # so a modulator switched on mid-beat waits for the next beat.
            if period != self.period and (self.period is not None or cycles == period):
                self.envelope.trigger(t)
            self.period = period
        return self.depth * self.envelope.level(t)


class _AudioSource:
    def __init__(self, spec: ModulatorSpec, audio: AudioLevels | None) -> None:
        self.audio = audio
        self.band = spec.band
        self.gain = spec.gain
        self.depth = spec.depth
        self.attack = spec.attack
        self.release = spec.release
        self.level = 0.0
        self.last: float | None = None

    def offset(self, seconds: float, beats: float, beats_per_bar: float) -> float:
        if self.audio is None:
            return 0.0
        target = min(1.0, self.gain * self.audio.instant(self.band))
        if self.last is None:
            self.level = target
        else:
            constant = self.attack if target > self.level else self.release
            self.level += smoothing_coefficient(max(0.0, seconds - self.last), constant) * (
                target - self.level
            )
        self.last = seconds
        return self.depth * self.level


def _clamp(value: float, target: Target) -> float:
    if target.minimum is not None and value < target.minimum:
        return target.minimum
    if target.maximum is not None and value > target.maximum:
        return target.maximum
    return value


class Modulation:
    """A list of modulators, evaluated once per frame as base + the sum of their offsets.

    ``values`` never changes the base mapping it reads: the caller keeps the base values (OSC
    echoes, scenes, autosave) and applies the modulated ones separately. Per frame it costs a
    few Python float operations per modulator; no tensors, no arrays.

    Args:
        specs: the modulators (disabled ones are kept but add nothing).
        audio: the follower that audio modulators read (``None``: they add 0).
    """

    def __init__(self, specs: Sequence[ModulatorSpec] = (), audio: AudioLevels | None = None) -> None:
        if len(specs) > MAX_MODULATORS:
            raise ValueError(f"{len(specs)} modulators given; allowed: at most {MAX_MODULATORS}")
        names = [spec.name for spec in specs if spec.name is not None]
        if len(set(names)) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"modulator names {twice} are used twice; allowed: each name once")
        self.specs = tuple(specs)
        self._sources: list[_Source] = [self._source(spec, audio) for spec in self.specs]
        active = [
            (spec.parsed_target, source) for spec, source in zip(self.specs, self._sources) if spec.enabled
        ]
        self._active = [((target.name, target.index), source) for target, source in active]
        self._targets = list({(target.name, target.index): target for target, _ in active}.values())
        self._weights = frozenset(target.name for target, _ in active if target.is_weight)
        self.targets = frozenset(target.name for target, _ in active)
        """The parameter names this modulation may change."""

    @staticmethod
    def _source(spec: ModulatorSpec, audio: AudioLevels | None) -> _Source:
        if spec.kind is ModulatorKind.LFO:
            return _LfoSource(spec)
        if spec.kind is ModulatorKind.ENVELOPE:
            return _EnvelopeSource(spec)
        return _AudioSource(spec, audio)

    def _envelope(self, key: int | str) -> _EnvelopeSource:
        for index, (spec, source) in enumerate(zip(self.specs, self._sources)):
            if (key == index or key == spec.name) and isinstance(source, _EnvelopeSource):
                return source
        names = [
            spec.name or str(i) for i, spec in enumerate(self.specs) if spec.kind is ModulatorKind.ENVELOPE
        ]
        raise ValueError(
            f"modulator {key!r} is not an envelope; allowed: {', '.join(names) or 'none configured'}"
        )

    def trigger(self, key: int | str, seconds: float, beats: float) -> None:
        """Fire envelope ``key`` (its index or name) now."""
        source = self._envelope(key)
        source.envelope.trigger(source.envelope.unit.pick(seconds, beats))

    def release(self, key: int | str, seconds: float, beats: float) -> None:
        """Release envelope ``key`` (its index or name) now."""
        source = self._envelope(key)
        source.envelope.release(source.envelope.unit.pick(seconds, beats))

    def values(
        self, base: Mapping[str, Any], seconds: float, beats: float, beats_per_bar: float = 4.0
    ) -> dict[str, Any]:
        """The modulated value of every targeted parameter that ``base`` holds (not ``None``).

        A scalar is ``base + Σ offsets`` clamped to the registry range; a list item (or a blend
        weight, kept >= 0) likewise, in a copy of the list; an item the list lacks is left out.
        A blend whose weights would all be 0 keeps its base weights for that frame.
        """
        offsets: dict[tuple[str, int | None], float] = {}
        for key, source in self._active:
            offsets[key] = offsets.get(key, 0.0) + source.offset(seconds, beats, beats_per_bar)
        result: dict[str, Any] = {}
        for target in self._targets:
            name = target.name
            current = result[name] if name in result else base.get(name)
            if current is None:
                continue
            offset = offsets[name, target.index]
            if target.index is None:
                result[name] = _clamp(current + offset, target)
                continue
            if target.index >= len(current):
                continue
            items = current if name in result else list(current)
            if target.is_weight:
                item, weight = items[target.index]
                items[target.index] = (item, _clamp(weight + offset, target))
            else:
                items[target.index] = _clamp(items[target.index] + offset, target)
            result[name] = items
        for name in self._weights:
            if name in result and sum(weight for _, weight in result[name]) <= 0:
                result[name] = list(base[name])
        return result


def _problem(exc: Exception, where: str) -> str:
    """The first problem of a pydantic error (or a ValueError) as ``where.field: message``."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return f"{where}: {exc}"
    first = errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    shown = first.get("input")
    value = "" if isinstance(shown, dict) else f" (got {shown!r:.60})"
    return f"{where}{'.' + field if field else ''}: {message}{value}"


def check_modulators(value: Any) -> list[dict[str, Any]]:
    """The registry's check of ``modulators``: a list of modulator mappings (``None``: none), in
    canonical plain form (defaults left out); a ValueError naming the item, field and value."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{value!r:.60} is not a list; allowed: a list of modulators, [] for none")
    specs = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            allowed = "{target: ..., ...}"
            raise ValueError(f"modulators[{index}] {item!r:.60} is not a mapping; allowed: {allowed}")
        try:
            specs.append(ModulatorSpec.model_validate(dict(item)))
        except ValueError as exc:
            raise ValueError(_problem(exc, f"modulators[{index}]")) from None
    Modulation(specs)  # the list as a whole: its length, names used once
    return [spec.model_dump(mode="json", exclude_defaults=True) | {"target": spec.target} for spec in specs]


def modulator_index(value: Sequence[Mapping[str, Any]], key: int | str) -> int:
    """The index of modulator ``key`` (an index or a name) in ``value``; a ValueError naming it."""
    names = [str(item.get("name")) for item in value if item.get("name")]
    allowed = f"an index 0..{len(value) - 1}" if value else "none is configured"
    if names:
        allowed += f" or a name ({', '.join(names)})"
    if isinstance(key, bool):
        raise ValueError(f"modulator {key!r} is not known; allowed: {allowed}")
    if isinstance(key, int) and 0 <= key < len(value):
        return key
    if isinstance(key, str):
        for index, item in enumerate(value):
            if item.get("name") == key:
                return index
        if key.isdigit() and int(key) < len(value):
            return int(key)
    raise ValueError(f"modulator {key!r:.40} is not known; allowed: {allowed}")


def edit_modulator(value: Sequence[Mapping[str, Any]], key: int | str, **fields: Any) -> list[dict[str, Any]]:
    """``value`` with ``fields`` of modulator ``key`` replaced, checked as a whole (a ValueError
    naming the bad field otherwise); ``value`` itself is not changed."""
    index = modulator_index(value, key)
    edited = [dict(item) for item in value]
    edited[index].update(fields)
    return check_modulators(edited)


def envelope_key(value: Sequence[Mapping[str, Any]], key: int | str) -> int:
    """The index of envelope modulator ``key``; a ValueError naming it and the envelopes."""
    index = modulator_index(value, key)
    if value[index].get("kind") != ModulatorKind.ENVELOPE.value:
        envelopes = [
            str(item.get("name", i))
            for i, item in enumerate(value)
            if item.get("kind") == ModulatorKind.ENVELOPE.value
        ]
        raise ValueError(
            f"modulator {key!r:.40} is not an envelope; allowed: {', '.join(envelopes) or 'none configured'}"
        )
    return index
