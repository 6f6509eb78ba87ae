"""The one registry of live parameters: OSC, feedback, OSCQuery, docs and TD derive from it."""

from __future__ import annotations

import copy
import functools
import importlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import yaml

from engine.stream.modes import BlendMethod, CfgType, allowed
from engine.tempo.clock import MAX_BPM, MIN_BPM, Quantum

MAX_PROMPT_CHARS = 2000
MAX_BLEND_ITEMS = 8
MAX_T_INDEX_ITEMS = 8
MAX_SEED = 2**31 - 1
MAX_LORAS = 16
MAX_CONTROLNETS = 4
MAX_CONTROLNET_SCALE = 2.0
MAX_FEATURE_FRAMES = 4
MAX_BUNDLE_AHEAD_S = 60.0
"""A bundle may be stamped at most this far in the future (cue software fires within a minute)."""
MAX_TIMED_WAITING = 256
"""At most this many messages of future-stamped bundles wait at once (a flood stays bounded)."""
IMAGE_FILE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.(?i:png|jpe?g|webp)"
IMAGE_FILE_TEXT = (
    "a .png, .jpg or .webp file name in the presets folder (letters, digits, '_', '.', '-'), never a path"
)
QUANTA = tuple(quantum.value for quantum in Quantum)
"""Where a quantised change lands: off | beat | bar | 2bars | 4bars."""
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
"""Output size limits (the same as ``stream.width`` / ``stream.height`` in the config)."""


class ParamKind(str, Enum):
    """The value type of a live parameter."""

    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STRING = "string"
    ENUM = "enum"
    INT_LIST = "int_list"
    FLOAT_LIST = "float_list"
    PROMPT_BLEND = "prompt_blend"
    SEED_BLEND = "seed_blend"
    SIZE = "size"
    STRUCT = "struct"  # structured data (modulators, a prompt sequence): YAML / JSON text over OSC
    ACTION = "action"


class Applies(str, Enum):
    """Where a live parameter takes effect."""

    PIPELINE = "pipeline"  # StreamPipeline.plan / commit
    RUNTIME = "runtime"  # the engine's frame loop (bypass, pause, tempo, modulators, sequence)
    CONTROL = "control"  # actions the control service answers (scenes, /status)


class ParamError(ValueError):
    """A live parameter value that was refused; the message names the value and what is allowed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@dataclass(frozen=True)
class ParamSpec:
    """One live parameter.

    Attributes:
        name: snake_case key used in ControlState, scenes and ``StreamPipeline.apply``.
        kind: value type.
        default: value when neither config nor OSC set it (``None`` for actions).
        doc: one line for humans.
        osc_address: main OSC address (flat snake_case at the root).
        osc_args: OSC type tags as shown to users, e.g. ``"s [f]"``.
        aliases: extra OSC addresses that mean the same.
        minimum, maximum: inclusive numeric bounds (for lists: bounds of each item).
        choices: allowed values of an ENUM.
        max_items: longest list accepted (lists and blends).
        min_items: shortest number list accepted (``None``: 1); equal to ``max_items`` for a list of
            a fixed length, e.g. ``/feedback/translate f f``.
        in_scene: saved by ``/preset/save`` and restored by ``/preset/load``.
        restored: kept in the live-state autosave and restored when the supervisor restarts
            the engine (``live_state_params``); actions never are.
        group: the heading it is listed under (docs, OSCQuery containers, the TD page).
        applies: where it takes effect (the pipeline, the engine loop, the control service).
        per_frame: a value of the engine loop read on every frame (the feedback transform), so a
            modulator may move it like a continuous pipeline value (``modulatable``).
        changes_shape: may change the shapes the UNet / VAE run at (n, cfg batch, size), so a
            backend with static engines builds before the change commits.
        needs_encoding: the text encoder runs before the change may apply (off the frame loop).
        overridden_by: a parameter whose newer value clears this one (``/prompt`` ends a
            prompt blend; ``/t_index_list`` replaces what ``/strength`` made of it).
        config_key: ``section.key`` of its starting value in config.yaml (``None``: none there);
            the config schema takes that field's default and range from this spec.
        pattern, pattern_text: a regular expression a STRING must match in full, and what it
            allows in words (e.g. a file name in the presets folder, never a path).
        model: for a STRUCT, ``module:function`` that validates the plain data and returns it in
            canonical form (a ``ValueError`` naming the bad field and what is allowed otherwise);
            imported when the first value is checked.
    """

    name: str
    kind: ParamKind
    default: Any
    doc: str
    osc_address: str
    osc_args: str
    aliases: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_items: int | None = None
    min_items: int | None = None
    in_scene: bool = True
    restored: bool = True
    group: str = "stream"
    applies: Applies = Applies.PIPELINE
    per_frame: bool = False
    changes_shape: bool = False
    needs_encoding: bool = False
    overridden_by: str | None = None
    config_key: str | None = None
    pattern: str | None = None
    pattern_text: str = ""
    model: str | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        """The main address followed by its aliases."""
        return (self.osc_address, *self.aliases)

    def allowed_text(self) -> str:
        """What this parameter accepts, in words, for error messages and docs."""
        if self.kind is ParamKind.ENUM:
            return " | ".join(self.choices)
        if self.kind is ParamKind.BOOL:
            return "true | false (or 1 | 0)"
        if self.kind is ParamKind.STRING:
            return self.pattern_text or f"text of at most {MAX_PROMPT_CHARS} characters"
        if self.kind is ParamKind.INT_LIST:
            return (
                f"1 to {self.max_items} strictly increasing integers "
                f"in [{_fmt(self.minimum)}, {_fmt(self.maximum)}]"
            )
        if self.kind is ParamKind.FLOAT_LIST:
            least = self.min_items or 1
            count = f"exactly {least}" if least == self.max_items else f"{least} to {self.max_items}"
            return f"{count} numbers in [{_fmt(self.minimum)}, {_fmt(self.maximum)}]"
        if self.kind is ParamKind.PROMPT_BLEND:
            return f"1 to {self.max_items} pairs (prompt, weight >= 0), weights not all 0"
        if self.kind is ParamKind.SEED_BLEND:
            return (
                f"1 to {self.max_items} pairs (seed in [0, {MAX_SEED}], weight >= 0), "
                "weights not all 0"
            )
        if self.kind is ParamKind.SIZE:
            return (
                f"width and height (two integers or 'WxH'), each a multiple of {SIDE_MULTIPLE} "
                f"in [{_fmt(self.minimum)}, {_fmt(self.maximum)}]"
            )
        if self.kind is ParamKind.STRUCT:
            return self.pattern_text or "YAML or JSON text"
        if self.kind is ParamKind.ACTION:
            return self.pattern_text or ("no value" if not self.osc_args else "a name")
        return f"a number in [{_fmt(self.minimum)}, {_fmt(self.maximum)}]"

    def coerce(self, value: Any) -> Any:
        """Validate ``value`` and return it in canonical form; raise ``ParamError`` if refused."""
        return _COERCERS[self.kind](self, value)


def _fmt(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


def check_number(spec: ParamSpec, value: Any) -> float:
    """``value`` as a finite float, or a ``ParamError`` naming it and what ``spec`` allows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(spec.name, f"{value!r} is not a number; allowed: {spec.allowed_text()}")
    if not math.isfinite(float(value)):
        raise ParamError(spec.name, f"{value!r} is not finite; allowed: {spec.allowed_text()}")
    return float(value)


def _check_range(spec: ParamSpec, value: float, shown: Any) -> None:
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        raise ParamError(spec.name, f"{shown!r} is out of range; allowed: {spec.allowed_text()}")


def _coerce_float(spec: ParamSpec, value: Any) -> float:
    number = check_number(spec, value)
    _check_range(spec, number, value)
    return number


def _whole(spec: ParamSpec, item: Any, what: str = "item") -> int:
    """``item`` as an int when it is a whole number (not a bool), else a ParamError naming it."""
    if isinstance(item, bool) or not isinstance(item, (int, float)) or not float(item).is_integer():
        raise ParamError(spec.name, f"{what} {item!r} is not an integer; allowed: {spec.allowed_text()}")
    return int(item)


def _coerce_int(spec: ParamSpec, value: Any) -> int:
    number = check_number(spec, value)
    if not number.is_integer():
        raise ParamError(
            spec.name, f"{value!r} is not a whole number; allowed: {spec.allowed_text()}"
        )
    _check_range(spec, number, value)
    return int(number)


def _coerce_bool(spec: ParamSpec, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off"):
        return value.strip().lower() in ("true", "on")
    raise ParamError(spec.name, f"{value!r} is not a switch; allowed: {spec.allowed_text()}")


def _coerce_string(spec: ParamSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise ParamError(spec.name, f"{value!r} is not text; allowed: {spec.allowed_text()}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ParamError(
            spec.name,
            f"text of {len(value)} characters is too long; allowed: {spec.allowed_text()}",
        )
    if spec.pattern is not None and (re.fullmatch(spec.pattern, value) is None or ".." in value):
        raise ParamError(spec.name, f"{value!r:.80} is not allowed; allowed: {spec.allowed_text()}")
    return value


def _coerce_enum(spec: ParamSpec, value: Any) -> str:
    text = value.value if isinstance(value, Enum) else value
    if not isinstance(text, str) or text not in spec.choices:
        raise ParamError(spec.name, f"{value!r} is not allowed; allowed: {spec.allowed_text()}")
    return text


def _coerce_int_list(spec: ParamSpec, value: Any) -> list[int]:
    items = _as_sequence(spec, value)
    if not 1 <= len(items) <= (spec.max_items or MAX_T_INDEX_ITEMS):
        raise ParamError(spec.name, f"{len(items)} items given; allowed: {spec.allowed_text()}")
    result = []
    for item in items:
        _check_range(spec, float(_whole(spec, item)), item)
        result.append(int(item))
    if any(b <= a for a, b in itertools.pairwise(result)):
        raise ParamError(
            spec.name, f"{result} is not strictly increasing; allowed: {spec.allowed_text()}"
        )
    return result


def _coerce_float_list(spec: ParamSpec, value: Any) -> list[float]:
    items = _as_sequence(spec, value)
    if not (spec.min_items or 1) <= len(items) <= (spec.max_items or MAX_LORAS):
        raise ParamError(spec.name, f"{len(items)} items given; allowed: {spec.allowed_text()}")
    return [_coerce_float(spec, item) for item in items]


def _pairs(spec: ParamSpec, value: Any) -> list[tuple[Any, float]]:
    items = _as_sequence(spec, value)
    if items and not isinstance(items[0], (list, tuple)):
        if len(items) % 2:
            raise ParamError(
                spec.name, f"{len(items)} values do not form pairs; allowed: {spec.allowed_text()}"
            )
        items = [tuple(items[i : i + 2]) for i in range(0, len(items), 2)]
    if not 1 <= len(items) <= (spec.max_items or MAX_BLEND_ITEMS):
        raise ParamError(spec.name, f"{len(items)} pairs given; allowed: {spec.allowed_text()}")
    pairs = []
    for pair in items:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ParamError(spec.name, f"{pair!r} is not a pair; allowed: {spec.allowed_text()}")
        weight = pair[1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ParamError(
                spec.name, f"weight {weight!r} is not a number; allowed: {spec.allowed_text()}"
            )
        if not math.isfinite(float(weight)) or weight < 0:
            raise ParamError(
                spec.name, f"weight {weight!r} is not >= 0; allowed: {spec.allowed_text()}"
            )
        pairs.append((pair[0], float(weight)))
    if sum(w for _, w in pairs) <= 0:
        raise ParamError(spec.name, f"weights are all 0; allowed: {spec.allowed_text()}")
    return pairs


def _coerce_prompt_blend(spec: ParamSpec, value: Any) -> list[tuple[str, float]]:
    pairs = _pairs(spec, value)
    for prompt, _ in pairs:
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise ParamError(
                spec.name,
                f"prompt {prompt!r:.60} is not valid text; allowed: {spec.allowed_text()}",
            )
    return [(str(p), w) for p, w in pairs]


def _coerce_seed_blend(spec: ParamSpec, value: Any) -> list[tuple[int, float]]:
    pairs = _pairs(spec, value)
    result = []
    for seed, weight in pairs:
        _whole(spec, seed, "seed")
        if not 0 <= seed <= MAX_SEED:
            raise ParamError(
                spec.name, f"seed {seed!r} is out of range; allowed: {spec.allowed_text()}"
            )
        result.append((int(seed), weight))
    return result


_SIZE_TEXT = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")


def _coerce_size(spec: ParamSpec, value: Any) -> list[int]:
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one OSC string argument: "1280x720"
    if isinstance(value, str):
        match = _SIZE_TEXT.fullmatch(value)
        if match is None:
            raise ParamError(spec.name, f"{value!r:.40} is not WIDTHxHEIGHT; allowed: {spec.allowed_text()}")
        value = [int(match.group(1)), int(match.group(2))]
    items = _as_sequence(spec, value)
    if len(items) != 2:
        raise ParamError(spec.name, f"{len(items)} numbers given; allowed: {spec.allowed_text()}")
    result = []
    for item in items:
        _check_range(spec, float(_whole(spec, item, "side")), item)
        if int(item) % SIDE_MULTIPLE:
            raise ParamError(
                spec.name, f"{int(item)} is not a multiple of {SIDE_MULTIPLE}; allowed: {spec.allowed_text()}"
            )
        result.append(int(item))
    return result


def _coerce_action(spec: ParamSpec, value: Any) -> Any:
    if spec.osc_args and not isinstance(value, str):
        raise ParamError(spec.name, f"{value!r} is not a name; allowed: {spec.allowed_text()}")
    return value


def _coerce_struct(spec: ParamSpec, value: Any) -> Any:
    """Plain data, or YAML / JSON text of it (as OSC sends it), checked by ``spec.model``."""
    if isinstance(value, str):
        value = read_struct_text(spec, value)
    assert spec.model is not None, f"{spec.name}: a STRUCT needs its model"
    module, function = spec.model.split(":")
    check = getattr(importlib.import_module(module), function)
    try:
        return check(value)
    except ValueError as err:
        raise ParamError(spec.name, str(err)) from None


def read_struct_text(spec: ParamSpec, text: str) -> Any:
    """The plain data of YAML / JSON ``text`` sent for ``spec`` (empty text: ``None``), unchecked;
    a ``ParamError`` naming the text and what ``spec`` allows when it is too long or not YAML."""
    if len(text) > MAX_PROMPT_CHARS * 4:
        allowed = spec.allowed_text()
        raise ParamError(spec.name, f"text of {len(text)} characters is too long; allowed: {allowed}")
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not YAML"
        message = f"{text!r:.80} cannot be read ({problem}); allowed: {spec.allowed_text()}"
        raise ParamError(spec.name, message) from None


def struct_text(value: Any) -> str:
    """A STRUCT value as the one string its OSC address carries (compact JSON, also valid YAML)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _as_sequence(spec: ParamSpec, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ParamError(spec.name, f"{value!r} is not a list; allowed: {spec.allowed_text()}")
    return list(value)


_COERCERS = {
    ParamKind.FLOAT: _coerce_float,
    ParamKind.INT: _coerce_int,
    ParamKind.BOOL: _coerce_bool,
    ParamKind.STRING: _coerce_string,
    ParamKind.ENUM: _coerce_enum,
    ParamKind.INT_LIST: _coerce_int_list,
    ParamKind.FLOAT_LIST: _coerce_float_list,
    ParamKind.PROMPT_BLEND: _coerce_prompt_blend,
    ParamKind.SEED_BLEND: _coerce_seed_blend,
    ParamKind.SIZE: _coerce_size,
    ParamKind.STRUCT: _coerce_struct,
    ParamKind.ACTION: _coerce_action,
}


SOURCE_NAME_PATTERN = (
    r"pattern|(?:ndi|spout|syphon):[^\x00-\x1f\x7f]{1,256}|shm:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
    r"|file:[A-Za-z0-9][A-Za-z0-9 _.()-]{0,127}"
)
SOURCE_NAME_TEXT = (
    "a source name as /input/sources lists it: pattern, ndi:NAME, spout:NAME, syphon:NAME, shm:NAME "
    "or file:NAME (a video file name in the media folder, never a path)"
)
MAX_INPUT_CROSSFADE_FRAMES = 240


def _action(name: str, doc: str, address: str, args: str, group: str, allowed: str = "") -> ParamSpec:
    """An action the control service answers: never saved in scenes; ``allowed`` says what its
    arguments may be (default: "no value" or "a name", from ``args``)."""
    return ParamSpec(
        name,
        ParamKind.ACTION,
        None,
        doc,
        address,
        args,
        group=group,
        in_scene=False,
        applies=Applies.CONTROL,
        pattern_text=allowed,
    )


def _specs() -> tuple[ParamSpec, ...]:
    k = ParamKind
    return (
        ParamSpec(
            "prompt",
            k.STRING,
            "a photograph of a neon jellyfish, studio lighting",
            "Prompt; an optional second argument crossfades over that many seconds.",
            "/prompt",
            "s [f]",
            needs_encoding=True,
            config_key="stream.prompt",
        ),
        ParamSpec(
            "negative_prompt",
            k.STRING,
            "low quality, blurry",
            "Negative prompt, used by cfg_type full and onetime.",
            "/negative_prompt",
            "s",
            needs_encoding=True,
            config_key="stream.negative_prompt",
        ),
        ParamSpec(
            "prompt_blend",
            k.PROMPT_BLEND,
            None,
            "Weighted prompts mixed in embedding space; replaces /prompt while set.",
            "/prompt_blend",
            "(s f)+",
            max_items=MAX_BLEND_ITEMS,
            needs_encoding=True,
            overridden_by="prompt",
        ),
        ParamSpec(
            "prompt_blend_method",
            k.ENUM,
            BlendMethod.SLERP.value,
            "How /prompt_blend and /seed_blend mix: linear or slerp.",
            "/prompt_blend_method",
            "s",
            choices=tuple(m.value for m in BlendMethod),
            config_key="stream.prompt_blend_method",
        ),
        ParamSpec(
            "guidance_scale",
            k.FLOAT,
            1.2,
            "Guidance scale gamma; guidance acts only above 1.",
            "/guidance_scale",
            "f",
            aliases=("/guidance",),
            minimum=0.0,
            maximum=20.0,
            config_key="stream.guidance_scale",
        ),
        ParamSpec(
            "delta",
            k.FLOAT,
            1.0,
            "Residual-noise scale delta for R-CFG (self, onetime).",
            "/delta",
            "f",
            minimum=0.0,
            maximum=5.0,
            config_key="stream.delta",
        ),
        ParamSpec(
            "cfg_type",
            k.ENUM,
            CfgType.SELF.value,
            f"Guidance mode: {allowed(CfgType)} (changes the UNet batch).",
            "/cfg_type",
            "s",
            choices=tuple(m.value for m in CfgType),
            changes_shape=True,
            config_key="stream.cfg_type",
        ),
        ParamSpec(
            "seed",
            k.INT,
            2,
            "Seed of the cached per-slot noise.",
            "/seed",
            "i",
            minimum=0,
            maximum=MAX_SEED,
            config_key="stream.seed",
        ),
        ParamSpec(
            "seed_blend",
            k.SEED_BLEND,
            None,
            "Weighted seeds mixed into the cached noise.",
            "/seed_blend",
            "(i f)+",
            max_items=MAX_BLEND_ITEMS,
            overridden_by="seed",
        ),
        ParamSpec(
            "t_index_list",
            k.INT_LIST,
            [32, 45],
            "Denoising slots as indices into the LCM schedule; its length is n.",
            "/t_index_list",
            "i+",
            minimum=0,
            maximum=999,
            max_items=MAX_T_INDEX_ITEMS,
            changes_shape=True,
            config_key="stream.t_index_list",
        ),
        ParamSpec(
            "strength",
            k.FLOAT,
            None,
            "One knob 0..1 mapped onto t_index_list (keeps n; 1 = all noise, 0 = input).",
            "/strength",
            "f",
            minimum=0.0,
            maximum=1.0,
            in_scene=False,  # t_index_list holds the result
            restored=False,
            changes_shape=True,
            overridden_by="t_index_list",
        ),
        ParamSpec(
            "lora_scales",
            k.FLOAT_LIST,
            None,
            "Scales of the configured model.loras, in config order (the LCM-LoRA stays at 1).",
            "/lora_scales",
            "f+",
            minimum=-4.0,
            maximum=4.0,
            max_items=MAX_LORAS,
            group="model",
        ),
        ParamSpec(
            "controlnet_scales",
            k.FLOAT_LIST,
            None,
            "Scale of each configured model.controlnets entry, in config order; 0 switches one off "
            "(no rebuild: the scales are engine inputs).",
            "/controlnet_scales",
            "f+",
            minimum=0.0,
            maximum=MAX_CONTROLNET_SCALE,
            max_items=MAX_CONTROLNETS,
            group="conditioning",
        ),
        ParamSpec(
            "ip_adapter_scale",
            k.FLOAT,
            None,
            "How strongly the IP-Adapter reference image steers the style (model.ip_adapter.scale at "
            "start); 0: not at all.",
            "/ip_adapter_scale",
            "f",
            minimum=0.0,
            maximum=MAX_CONTROLNET_SCALE,
            group="conditioning",
        ),
        ParamSpec(
            "ip_adapter_image",
            k.STRING,
            None,
            "The IP-Adapter reference image: a file in the presets folder, encoded off the frame loop.",
            "/ip_adapter_image",
            "s",
            group="conditioning",
            needs_encoding=True,
            pattern=IMAGE_FILE_PATTERN,
            pattern_text=IMAGE_FILE_TEXT,
        ),
        ParamSpec(
            "resolution",
            k.SIZE,
            [512, 512],
            "Output width and height; a new size builds its engines first, the old size runs on.",
            "/resolution",
            "i i | s",
            minimum=MIN_SIDE,
            maximum=MAX_SIDE,
            in_scene=False,  # a show-level setting: recalling a look must not start engine builds
            changes_shape=True,
        ),
        ParamSpec(
            "similarity_filter_enabled",
            k.BOOL,
            False,
            "Skip near-identical input frames (stochastic similarity filter).",
            "/similarity_filter/enabled",
            "T|F|i",
            group="similarity_filter",
            config_key="similarity_filter.enabled",
        ),
        ParamSpec(
            "similarity_filter_threshold",
            k.FLOAT,
            0.98,
            "Cosine similarity eta above which frames may be skipped.",
            "/similarity_filter/threshold",
            "f",
            minimum=0.0,
            maximum=0.9999,
            group="similarity_filter",
            config_key="similarity_filter.threshold",
        ),
        ParamSpec(
            "similarity_filter_max_skip_frames",
            k.INT,
            10,
            "After this many skips in a row a frame is processed anyway.",
            "/similarity_filter/max_skip_frames",
            "i",
            minimum=0,
            maximum=10000,
            group="similarity_filter",
            config_key="similarity_filter.max_skip_frames",
        ),
        ParamSpec(
            "feature_cache_enabled",
            k.BOOL,
            False,
            "Self-attention also attends to features cached from past frames (StreamV2V): less "
            "flicker; costs attention time and memory.",
            "/feature_cache/enabled",
            "T|F|i",
            group="feature_cache",
            changes_shape=True,
            config_key="stream.feature_cache.enabled",
        ),
        ParamSpec(
            "feature_cache_frames",
            k.INT,
            2,
            "Past frames kept in the feature cache (more: steadier, slower).",
            "/feature_cache/frames",
            "i",
            minimum=1,
            maximum=MAX_FEATURE_FRAMES,
            group="feature_cache",
            changes_shape=True,
            config_key="stream.feature_cache.frames",
        ),
        ParamSpec(
            "feature_cache_interval",
            k.INT,
            1,
            "Refresh the cache with every n-th frame's features (1: every frame).",
            "/feature_cache/interval",
            "i",
            minimum=1,
            maximum=100,
            group="feature_cache",
            config_key="stream.feature_cache.interval",
        ),
        ParamSpec(
            "feature_cache_strength",
            k.FLOAT,
            1.0,
            "How much the cached frames weigh in self-attention (0: not at all, 1: like the current one).",
            "/feature_cache/strength",
            "f",
            minimum=0.0,
            maximum=1.0,
            group="feature_cache",
            config_key="stream.feature_cache.strength",
        ),
        ParamSpec(
            "feature_cache_injection",
            k.FLOAT,
            0.0,
            "Feature injection: pull each feature toward its nearest cached one by this much (0: off).",
            "/feature_cache/injection",
            "f",
            minimum=0.0,
            maximum=1.0,
            group="feature_cache",
            config_key="stream.feature_cache.injection",
        ),
        ParamSpec(
            "feature_cache_threshold",
            k.FLOAT,
            0.9,
            "Feature injection acts where the nearest cached feature's cosine similarity is above this.",
            "/feature_cache/threshold",
            "f",
            minimum=0.0,
            maximum=1.0,
            group="feature_cache",
            config_key="stream.feature_cache.threshold",
        ),
        ParamSpec(
            "feedback_amount",
            k.FLOAT,
            0.0,
            "Feedback: how much of the previous output, transformed, is mixed into the next input "
            "(0: off, the input untouched; txt2img generates from the fed-back picture when above 0).",
            "/feedback/amount",
            "f",
            minimum=0.0,
            maximum=1.0,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.amount",
        ),
        ParamSpec(
            "feedback_zoom",
            k.FLOAT,
            1.0,
            "Feedback zoom per frame (above 1 zooms in: content moves outward, a tunnel; below 1 zooms "
            "out, the picture mirrored at its edges).",
            "/feedback/zoom",
            "f",
            minimum=0.5,
            maximum=2.0,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.zoom",
        ),
        ParamSpec(
            "feedback_rotate",
            k.FLOAT,
            0.0,
            "Feedback rotation per frame in degrees, counter-clockwise.",
            "/feedback/rotate",
            "f",
            minimum=-45.0,
            maximum=45.0,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.rotate",
        ),
        ParamSpec(
            "feedback_translate",
            k.FLOAT_LIST,
            [0.0, 0.0],
            "Feedback shift per frame: x (right) and y (up) in fractions of the width and height.",
            "/feedback/translate",
            "f f",
            minimum=-0.5,
            maximum=0.5,
            max_items=2,
            min_items=2,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.translate",
        ),
        ParamSpec(
            "feedback_hue",
            k.FLOAT,
            0.0,
            "Feedback hue shift per frame in degrees (a rotation about the grey axis; 120: red to green).",
            "/feedback/hue",
            "f",
            minimum=-180.0,
            maximum=180.0,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.hue",
        ),
        ParamSpec(
            "feedback_decay",
            k.FLOAT,
            0.0,
            "Feedback fade per frame toward mid-grey (0: none, 1: the fed-back picture is flat grey).",
            "/feedback/decay",
            "f",
            minimum=0.0,
            maximum=1.0,
            group="feedback",
            applies=Applies.RUNTIME,
            per_frame=True,
            config_key="feedback.decay",
        ),
        ParamSpec(
            "bypass",
            k.BOOL,
            False,
            "Pass the input through unchanged.",
            "/bypass",
            "i",
            group="runtime",
            applies=Applies.RUNTIME,
        ),
        ParamSpec(
            "pause",
            k.BOOL,
            False,
            "Freeze the output on the last frame.",
            "/pause",
            "i",
            group="runtime",
            in_scene=False,
            applies=Applies.RUNTIME,
        ),
        ParamSpec(
            "input_source",
            k.STRING,
            "pattern",
            "Switch the main input live to a source by name (see /input/sources): the new one opens "
            "on its own thread, the old one plays until the new one's first frame, then they swap "
            "between two frames (crossfading over input_crossfade frames); one that cannot open is "
            "refused and the old one stays. Echoed when the switch is done; at start: the configured input.",
            "/input/select",
            "s",
            group="input",
            in_scene=False,
            applies=Applies.RUNTIME,
            pattern=SOURCE_NAME_PATTERN,
            pattern_text=SOURCE_NAME_TEXT,
        ),
        ParamSpec(
            "input_crossfade",
            k.INT,
            0,
            "Frames over which a switch of the main input crossfades from the old input's last frame "
            "(in pixel space; 0: a cut).",
            "/input/crossfade",
            "i",
            minimum=0,
            maximum=MAX_INPUT_CROSSFADE_FRAMES,
            group="input",
            in_scene=False,
            applies=Applies.RUNTIME,
        ),
        *(
            ParamSpec(
                f"controlnet_source_{index}",
                k.STRING,
                "",
                f"Switch the source of ControlNet {index} (model.controlnets[{index}] with a source of its "
                "own) live, as /input/select does for the main input ('': fed by the main input).",
                f"/controlnet/{index}/source",
                "s",
                group="input",
                in_scene=False,
                applies=Applies.RUNTIME,
                pattern=f"(?:{SOURCE_NAME_PATTERN})?",
                pattern_text=SOURCE_NAME_TEXT,
            )
            for index in range(MAX_CONTROLNETS)
        ),
        ParamSpec(
            "ip_adapter_source",
            k.STRING,
            "",
            "Switch the IP-Adapter's reference source (model.ip_adapter.source) live, as /input/select "
            "does for the main input ('': a reference image file).",
            "/ip_adapter/source",
            "s",
            group="input",
            in_scene=False,
            applies=Applies.RUNTIME,
            pattern=f"(?:{SOURCE_NAME_PATTERN})?",
            pattern_text=SOURCE_NAME_TEXT,
        ),
        _action(
            "input_sources",
            "Reply to the sender with the sources /input/select can switch to (NDI, Spout, Syphon, "
            "shared memory, the media folder's video files, the pattern), one name per argument.",
            "/input/sources",
            "",
            "input",
        ),
        ParamSpec(
            "bpm",
            k.FLOAT,
            120.0,
            "Tempo in beats per minute (tempo.source internal or osc; a MIDI clock or Link sets it "
            "otherwise and this is refused).",
            "/tempo/bpm",
            "f",
            minimum=MIN_BPM,
            maximum=MAX_BPM,
            in_scene=False,  # the music's tempo, not a look
            group="tempo",
            applies=Applies.RUNTIME,
            config_key="tempo.bpm",
        ),
        ParamSpec(
            "beats_per_bar",
            k.INT,
            4,
            "Beats in a bar (bars, 2bars and 4bars quanta and bar-rate modulators count them).",
            "/tempo/beats_per_bar",
            "i",
            minimum=1,
            maximum=32,
            in_scene=False,
            group="tempo",
            applies=Applies.RUNTIME,
            config_key="tempo.beats_per_bar",
        ),
        ParamSpec(
            "quantize",
            k.ENUM,
            "off",
            "Where scene loads and /q/... changes land: at once (off) or on the next beat, bar, 2 or 4 "
            "bars, committed early by the measured change-to-screen latency so they are seen on it.",
            "/quantize",
            "s",
            choices=QUANTA,
            in_scene=False,
            group="tempo",
            applies=Applies.RUNTIME,
            config_key="tempo.quantize",
        ),
        ParamSpec(
            "quantize_offset_ms",
            k.FLOAT,
            0.0,
            "Milliseconds added to the measured latency for quantised changes (a projector's or LED "
            "wall's own delay); negative lands them later.",
            "/quantize/offset_ms",
            "f",
            minimum=-1000.0,
            maximum=1000.0,
            in_scene=False,
            group="tempo",
            applies=Applies.RUNTIME,
            config_key="tempo.offset_ms",
        ),
        _action(
            "tempo_tap",
            "Tap tempo: four taps set the tempo and put the beat on the taps (an argument of 0, a "
            "button's release, is ignored).",
            "/tempo/tap",
            "[i]",
            "tempo",
            "no value, or a number (0 is ignored)",
        ),
        _action(
            "tempo_resync",
            "Now is the downbeat: beat 1 of a bar (the tempo stays).",
            "/tempo/resync",
            "[i]",
            "tempo",
            "no value, or a number (0 is ignored)",
        ),
        _action(
            "resolume_tempo",
            "Resolume's tempo fader, 0..1 over tempo.resolume_bpm_range (followed with tempo.source osc).",
            "/composition/tempocontroller/tempo",
            "f",
            "tempo",
            "a number in [0, 1] (with tempo.source osc)",
        ),
        _action(
            "resolume_tap",
            "Resolume's tap button (followed with tempo.source osc).",
            "/composition/tempocontroller/tempotap",
            "[i]",
            "tempo",
            "no value, or a number (0 is ignored; with tempo.source osc)",
        ),
        _action(
            "resolume_resync",
            "Resolume's resync button (followed with tempo.source osc).",
            "/composition/tempocontroller/resync",
            "[i]",
            "tempo",
            "no value, or a number (0 is ignored; with tempo.source osc)",
        ),
        ParamSpec(
            "modulators",
            k.STRUCT,
            [],
            "LFOs, envelopes and audio followers on continuous parameters: a YAML/JSON list of "
            "{target, kind, shape, rate, depth, ...}; value = base + modulation, clamped.",
            "/modulators",
            "s",
            group="modulation",
            applies=Applies.RUNTIME,
            config_key="modulators",
            model="engine.modulation.modulator:check_modulators",
            pattern_text="a YAML or JSON list of modulators (see README 'Playing to music'), [] for none",
        ),
        _action(
            "mod_depth",
            "Set one modulator's depth: its index or name, then the depth in the target's units.",
            "/mod/depth",
            "i|s f",
            "modulation",
            "a modulator (index or name) and a number",
        ),
        _action(
            "mod_rate",
            "Set one modulator's rate: its index or name, then '1bar', '1/4beat', '0.5hz' or Hz.",
            "/mod/rate",
            "i|s s|f",
            "modulation",
            "a modulator (index or name) and a rate",
        ),
        _action(
            "mod_enabled",
            "Switch one modulator on or off: its index or name, then 1 or 0.",
            "/mod/enabled",
            "i|s T|F|i",
            "modulation",
            "a modulator (index or name) and a switch",
        ),
        _action(
            "mod_add",
            "Add one modulator (YAML/JSON mapping) to the list.",
            "/mod/add",
            "s",
            "modulation",
            "one modulator as YAML or JSON text",
        ),
        _action(
            "mod_remove",
            "Remove one modulator: its index or name.",
            "/mod/remove",
            "i|s",
            "modulation",
            "a modulator (index or name)",
        ),
        _action(
            "mod_trigger",
            "Fire an envelope modulator (its index or name).",
            "/mod/trigger",
            "i|s",
            "modulation",
            "an envelope modulator (index or name)",
        ),
        _action(
            "mod_release",
            "Release a held envelope modulator (its index or name).",
            "/mod/release",
            "i|s",
            "modulation",
            "an envelope modulator (index or name)",
        ),
        ParamSpec(
            "sequence",
            k.STRUCT,
            None,
            "A prompt sequence: YAML/JSON {steps: [prompt or blend, ...], every: 4bars, crossfade: 1 "
            "(beats), loop: true, autostart: false}; steps land on the beat.",
            "/sequence",
            "s",
            group="sequence",
            applies=Applies.RUNTIME,
            config_key="sequence",
            model="engine.modulation.sequence:check_sequence",
            pattern_text="a YAML or JSON mapping {steps, every, crossfade, loop, autostart}, or '' for none",
        ),
        _action(
            "sequence_start",
            "Start the prompt sequence (from step 0, or the step given) on the next quantum.",
            "/sequence/start",
            "[i]",
            "sequence",
            "no value, or a step number",
        ),
        _action(
            "sequence_stop",
            "Stop the prompt sequence (the prompt playing stays).",
            "/sequence/stop",
            "",
            "sequence",
        ),
        _action(
            "sequence_jump",
            "Jump to a step of the prompt sequence on the next quantum (it keeps running).",
            "/sequence/jump",
            "i",
            "sequence",
            "a step number",
        ),
        _action(
            "midi_learn",
            "MIDI learn: the next cc, note, pitch bend or program change played binds this parameter "
            "(its action argument second: a scene, a modulator, a step); saved in the mapping file.",
            "/midi/learn",
            "s [s|i]",
            "midi",
            "a parameter name (see docs/osc.md), then its argument for preset_load / preset_save (a scene), "
            "mod_* (a modulator) or sequence_jump (a step)",
        ),
        _action(
            "midi_forget",
            "Remove the MIDI bindings of a parameter (only those with the argument, when given) from "
            "the mapping files.",
            "/midi/forget",
            "s [s|i]",
            "midi",
            "a parameter name, then optionally its argument",
        ),
        _action(
            "midi_unbind",
            "Remove one MIDI binding: a mapping's name and the binding's index in its file (as the "
            "operator page lists them).",
            "/midi/unbind",
            "s i",
            "midi",
            "a mapping name, then the binding's index (from 0)",
        ),
        _action(
            "midi_cancel",
            "Stop a MIDI learn that is waiting for a control.",
            "/midi/cancel",
            "",
            "midi",
        ),
        _action(
            "preset_load",
            "Recall a saved scene by name (prompt crossfades).",
            "/preset/load",
            "s",
            "scene",
        ),
        _action(
            "preset_save",
            "Save every live parameter as a scene by name.",
            "/preset/save",
            "s",
            "scene",
        ),
        _action(
            "status",
            "Reply to the sender with every current value.",
            "/status",
            "",
            "control",
        ),
    )


REGISTRY: dict[str, ParamSpec] = {spec.name: spec for spec in _specs()}


def names_where(
    applies: Applies | None = None,
    changes_shape: bool | None = None,
    needs_encoding: bool | None = None,
) -> tuple[str, ...]:
    """Names of the registry entries that match every given field, in registry order."""
    return tuple(
        spec.name
        for spec in REGISTRY.values()
        if (applies is None or spec.applies is applies)
        and (changes_shape is None or spec.changes_shape is changes_shape)
        and (needs_encoding is None or spec.needs_encoding is needs_encoding)
    )


PIPELINE_PARAMS = names_where(applies=Applies.PIPELINE)
"""What ``StreamPipeline.plan`` accepts."""
RUNTIME_PARAMS = names_where(applies=Applies.RUNTIME)
"""What the engine loop applies itself (bypass, pause, tempo, modulators, sequence, feedback)."""
FRAME_PARAMS = tuple(spec.name for spec in REGISTRY.values() if spec.per_frame)
"""Runtime values the frame loop reads on every frame (the feedback); modulators may move them."""
LIVE_PARAMS = PIPELINE_PARAMS + RUNTIME_PARAMS
"""Every value ``Engine.submit`` accepts (actions are answered by the control service)."""
SHAPE_PARAMS = names_where(changes_shape=True)
"""Changes that may need runners of another shape (n, the cfg batch, the output size); while
one waits for its engines, later ones join it."""
ENCODED_PARAMS = names_where(needs_encoding=True)
"""Changes the text encoder prepares before the engine may apply them."""


def overridden(names: Iterable[str]) -> set[str]:
    """The parameters a change of ``names`` clears (``overridden_by`` one of them)."""
    given = set(names)
    return {spec.name for spec in REGISTRY.values() if spec.overridden_by in given}


def merge_changes(older: Mapping[str, Any], newer: Mapping[str, Any]) -> dict[str, Any]:
    """Two changes as one, in order: newer values win and clear what they override."""
    merged = {name: value for name, value in older.items() if name not in overridden(newer)}
    merged.update(newer)
    return merged


def config_default(key: str) -> Any:
    """The registry default of the parameter whose starting value is config ``key``."""
    for spec in REGISTRY.values():
        if spec.config_key == key:
            return spec.default
    raise KeyError(f"no live parameter starts from config {key!r}")


def config_values(config: Any, names: Iterable[str]) -> dict[str, Any]:
    """The starting values of ``names`` that a validated config holds, each read from its
    ``config_key`` (``section.key``) as a deep copy; parameters without one are left out."""
    values = {}
    for name in names:
        key = REGISTRY[name].config_key
        if key is not None:
            values[name] = copy.deepcopy(functools.reduce(getattr, key.split("."), config))
    return values


def to_plain(value: Any) -> Any:
    """A coerced value as plain YAML/JSON data (tuples of blends become lists)."""
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


def live_state_params() -> list[str]:
    """Parameters the live-state autosave keeps: every live value a restart must bring back."""
    return [spec.name for spec in REGISTRY.values() if spec.restored and spec.kind is not ParamKind.ACTION]


BY_ADDRESS: dict[str, ParamSpec] = {
    address: spec for spec in REGISTRY.values() for address in spec.addresses
}


def get(name: str) -> ParamSpec:
    """The spec of ``name``; ``ParamError`` naming the known parameters when unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ParamError(name, f"unknown parameter; known: {', '.join(REGISTRY)}") from None


def validate_changes(
    changes: Mapping[str, Any], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Coerce every change; all-or-nothing, so a bad value leaves nothing half-applied."""
    accepted: dict[str, Any] = {}
    for name, value in changes.items():
        spec = get(name)
        if names is not None and name not in names:
            raise ParamError(name, f"not accepted here; accepted: {', '.join(names)}")
        accepted[name] = None if value is None and spec.default is None else spec.coerce(value)
    return accepted


def as_json() -> list[dict[str, Any]]:
    """The registry as plain data (for ``latentstage params --json`` and the TD builder)."""
    rows = []
    for spec in REGISTRY.values():
        rows.append(
            {
                "name": spec.name,
                "type": spec.kind.value,
                "default": spec.default,
                "min": spec.minimum,
                "max": spec.maximum,
                "choices": list(spec.choices),
                "max_items": spec.max_items,
                "min_items": spec.min_items,
                "osc_address": spec.osc_address,
                "osc_args": spec.osc_args,
                "aliases": list(spec.aliases),
                "group": spec.group,
                "in_scene": spec.in_scene,
                "doc": spec.doc,
                "allowed": spec.allowed_text(),
            }
        )
    return rows


def _span(spec: ParamSpec, spaced: bool) -> str:
    """Choices or ``min..max`` of ``spec`` for a table (``spaced``: ``a | b``, ``0 .. 1``)."""
    gap = " " if spaced else ""
    if spec.kind is ParamKind.ENUM:
        return f"{gap}|{gap}".join(spec.choices)
    if spec.minimum is not None or spec.maximum is not None:
        return f"{_fmt(spec.minimum)}{gap}..{gap}{_fmt(spec.maximum)}"
    return "-"


def as_table() -> str:
    """The registry as an aligned text table."""
    header = ("name", "type", "default", "range / choices", "OSC", "args", "doc")
    rows = [header]
    for spec in REGISTRY.values():
        span = _span(spec, spaced=False)
        address = " ".join(spec.addresses)
        default = "-" if spec.default is None else str(spec.default)
        rows.append(
            (spec.name, spec.kind.value, default, span, address, spec.osc_args or "-", spec.doc)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for i, row in enumerate(rows):
        cells = [cell.ljust(widths[j]) for j, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]))
        if i == 0:
            lines.append("  ".join(["-" * w for w in widths] + ["-" * 3]))
    return "\n".join(lines)


ENGINE_STATES = "loading | warming | running | paused | stalled | lost | error | restarting | stopped"
"""What ``/engine/state`` says (``EngineState`` in engine/runtime/stats.py; a test keeps them equal)."""

@dataclass(frozen=True)
class StatusSpec:
    """One read-only ``/engine/<name>`` feedback address (OSCQuery node, docs, status sender).

    ``periodic``: sent ``osc.status_hz`` times a second from the status snapshot's ``name``
    (else sent when it happens, like ``error``). ``empty``: what is sent while the snapshot has
    no value.
    """

    name: str
    tag: str
    doc: str
    periodic: bool = True

    @property
    def address(self) -> str:
        return f"/engine/{self.name}"

    def osc_value(self, value: Any) -> str | float | int:
        """``value`` from the status snapshot as this address's OSC argument."""
        if self.tag == "f":
            return float(value or 0.0)
        if self.tag == "i":
            return int(value or 0)
        return str(value if value is not None else "")


STATUS: tuple[StatusSpec, ...] = (
    StatusSpec("state", "s", ENGINE_STATES),
    StatusSpec("fps", "f", "output frames per second"),
    StatusSpec("latency_ms", "f", "source frame to output, milliseconds (mean over the last frames)"),
    StatusSpec("skip_rate", "f", "share of input frames the similarity filter skipped"),
    StatusSpec(
        "building", "s", "engines prepared for a shape change, e.g. `batch 2 at 768x512`; empty: none"
    ),
    StatusSpec(
        "change_latency_ms",
        "f",
        "a committed change to the first output frame carrying it sent, milliseconds (median of the "
        "last 16 changes, the slowest output): what a change on the beat is committed ahead by",
    ),
    StatusSpec("bpm", "f", "the tempo the clock runs at (its source: tempo.source)"),
    StatusSpec(
        "beat",
        "i",
        "sent on each beat: the beat in the bar, 1 = the downbeat (at most 20 a second)",
        periodic=False,
    ),
    StatusSpec("sequence_step", "i", "the prompt sequence's step playing; -1: not running"),
    StatusSpec(
        "midi",
        "s",
        "the MIDI controllers: connected or waiting (by port name prefix), a learn going on, the last "
        "learnt or forgotten binding; sent when it changes",
        periodic=False,
    ),
    StatusSpec("restarts", "i", "how often `run --supervise` restarted the engine after a crash or a hang"),
    StatusSpec(
        "replicas",
        "i",
        "pipeline replicas making frames now (`scale.replicas`; fewer while one is out or restarting; "
        "1: the engine runs the pipeline itself)",
    ),
    StatusSpec("error", "s", "why a message or a frame was refused; nothing changed", periodic=False),
)
"""The status addresses, in the order they are sent and documented."""


MODULATED_PREFIX = "/engine/mod"
"""Modulated values go out on ``/engine/mod/<name>`` (the base stays on the parameter's address)."""
MODULATED_ITEM_KINDS = (ParamKind.FLOAT_LIST, ParamKind.PROMPT_BLEND, ParamKind.SEED_BLEND)
"""Kinds whose items a modulator moves (a blend: the weight of a pair)."""


def modulatable(spec: ParamSpec) -> bool:
    """Whether a modulator may move ``spec``: a continuous scalar of the pipeline (``strength``
    keeps n, so no shape changes) or of the frame loop (``per_frame``: the feedback), or the items
    (blend weights) of a number list or a blend."""
    scalar = spec.kind is ParamKind.FLOAT and (spec.applies is Applies.PIPELINE or spec.per_frame)
    return scalar or spec.kind in MODULATED_ITEM_KINDS


def modulated_address(name: str) -> str:
    """Where the modulated value of parameter ``name`` is sent (at ``osc.modulation_hz`` at most)."""
    return f"{MODULATED_PREFIX}/{name}"


def as_markdown() -> str:
    """docs/osc.md: the OSC address space, generated from this registry (CI checks it)."""
    lines = [
        "# OSC address space",
        "",
        "Generated from `engine/params.py` by `latentstage params --markdown > docs/osc.md`;",
        "a test fails when this file and the registry drift apart.",
        "",
        "The engine listens on `127.0.0.1:9000` (config `osc.host`, `osc.port`) and sends feedback to",
        "`127.0.0.1:9001` (`osc.feedback`). Binding to another address needs `osc.allow` (addresses or",
        "networks); messages from anywhere else are dropped and counted. Ints are accepted where floats are",
        "meant, bundles are unpacked, and changes apply at the next frame boundary (a bundle stamped in",
        "the future: at its time, see below).",
        "",
        "`osc.forward` (`host:port` of other engines) relays every accepted change to them, on its own",
        "address with the echo's arguments, so one engine's OSC and operator page steer several machines;",
        "status addresses (`/engine/...`) are not forwarded. An engine echoes every change it accepts,",
        "an unchanged value too: forward in one direction only (a chain or a tree, never a cycle; two",
        "engines forwarding to each other would pass one change back and forth forever).",
        "",
        "## Parameters and actions",
        "",
        "| address | args | range / choices | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in REGISTRY.values():
        address = " ".join(f"`{a}`" for a in spec.addresses)
        span = _span(spec, spaced=True)
        if spec.max_items:
            exactly = spec.min_items == spec.max_items
            span += f" ({'exactly' if exactly else 'at most'} {spec.max_items})"
        default = "-" if spec.default is None else f"`{spec.default!r}`"
        args = f"`{spec.osc_args}`" if spec.osc_args else "-"
        cells = (address, args, span, default, spec.doc)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += [
        "",
        "## Feedback",
        "",
        "Every accepted change is echoed on its own address to the feedback targets, so two-way",
        "surfaces (TouchOSC, Open Stage Control, the TouchDesigner component) follow. `/status` answers",
        "the sender with every current value. A few times a second (`osc.status_hz`) the engine sends:",
        "",
        "| address | args | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{spec.address}` | `{spec.tag}` | {spec.doc} |" for spec in STATUS]
    lines += [
        "",
        "While a modulator moves a parameter, its modulated value goes out on its own address (the",
        "base value stays on the parameter's address and is what scenes and the autosave hold), at",
        "most `osc.modulation_hz` times a second, with the parameter's own arguments:",
        "",
        "| address | args | modulated value of |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{modulated_address(spec.name)}` | `{spec.osc_args}` | `{spec.osc_address}` |"
        for spec in REGISTRY.values()
        if modulatable(spec)
    ]
    lines += [
        "",
        "## Refused messages",
        "",
        "A wrong type, a value out of range, NaN or infinity, an unknown address, a string",
        f"longer than {MAX_PROMPT_CHARS} characters, a blend of more than {MAX_BLEND_ITEMS} pairs",
        "or a bundle nested deeper than 8 changes nothing. The engine answers `/engine/error`",
        "with the parameter, the bad value and what is allowed (at most 10 answers per address",
        "and second) and logs it once per address per second. A message whose data is shorter than",
        "its type tags promise (`/guidance_scale ,f` with no float, or with one byte of it) is refused",
        "as malformed: nothing is filled in with zeros.",
        "",
        "## Timed bundles",
        "",
        "Bundles are honoured by their OSC time tag, so cue software can send a change ahead of time:",
        "",
        "- \"immediately\" (time tag 1) and a time in the past apply at once, as plain messages do;",
        "- a time in the future applies at the first frame boundary at or after it (it lands in the",
        "  engine's state at that time; the frame loop picks it up with the next frame; a prompt is",
        "  encoded from that time, a few milliseconds on a GPU, as an untimed one is). Each message",
        "  is validated when it arrives, so a bad value is answered at once; a scene that is gone by",
        "  the time its `/preset/load` is due answers then;",
        f"- at most {MAX_BUNDLE_AHEAD_S:g} s ahead and at most {MAX_TIMED_WAITING} messages waiting at once;",
        "  beyond that the message is refused with `/engine/error` and nothing changes.",
        "",
        "Time tags are wall-clock (NTP) times: the sender's clock and this machine's must agree (NTP or",
        "the same machine). Held messages are not saved: a restart forgets them.",
        "",
        "## Musical time: quantised changes, modulators, sequences",
        "",
        "`/quantize s` (`" + " | ".join(QUANTA) + "`) says where scene loads land. Any other change lands on",
        "the beat when it is sent to a prefixed address:",
        "",
        "- `/q/<address> args`: on the next boundary of the global `/quantize` (at once while it is `off`),",
        "  e.g. `/q/prompt s \"a glowing forest\"`;",
        "- `/q/<quantum>/<address> args`: on the next `beat`, `bar`, `2bars` or `4bars`, e.g.",
        "  `/q/bar/guidance_scale f 3.0` or `/q/4bars/preset/load s drop`.",
        "",
        "A scene file may carry its own `quantize:` (it wins over the global one). The engine commits a",
        "quantised change ahead of the boundary by its measured change-to-screen latency",
        "(`/engine/change_latency_ms`) plus `/quantize/offset_ms`, so the first output frame carrying",
        "it leaves on the beat; its prompt is encoded while it waits. Actions other than `/preset/load`",
        "cannot be quantised (refused with `/engine/error`).",
        "",
        "`/modulators s` takes the whole list as YAML or JSON text, e.g.",
        "`[{target: guidance_scale, shape: sine, rate: 1bar, depth: 0.3}]` (fields: `target`, `kind` lfo |",
        "envelope | audio, `name`, `shape`, `rate`, `depth`, `phase`, `seed`, `attack`, `decay`, `sustain`,",
        "`release`, `hold`, `time_unit`, `band`, `gain`, `enabled`); it is echoed as compact JSON.",
        "`/mod/...` edits one modulator by index or name. `/sequence s` takes `{steps: [...], every: 4bars,",
        "crossfade: 2, loop: true, autostart: false}`; an empty string clears it.",
        "",
        "## Changes that change shapes",
        "",
        "Three changes alter the shapes the UNet and VAE run at: `/t_index_list` of another length,",
        "`/cfg_type` and `/resolution` (`/strength` keeps n). On the `torch` backend they apply at the",
        "next frame. On `onnxruntime` and `tensorrt` the engine first exports or builds the",
        "engines of the new shapes in the background (`/engine/building` names them; a TensorRT build",
        "takes minutes, a cached engine loads in seconds) while the current configuration keeps",
        "playing; the change then applies at a frame boundary and is echoed. Shape changes sent while",
        "one waits join it and the newer value wins (`/t_index_list` then `/resolution` gives both;",
        "asking for the size already playing cancels a waiting switch). A failed build answers",
        "`/engine/error` and changes nothing. The previous shapes stay loaded for a quick way back;",
        "older ones are released (they stay cached on disk; `latentstage build --size WxH` prebuilds sizes).",
        "",
        "`/resolution` resamples the frames already in the stream batch, so the picture continues",
        "without a new warm-up. The input is centre-cropped to the new aspect and scaled; Spout,",
        "Syphon, NDI, shared memory and the preview send the new size; a recording keeps the size it",
        "started with and letterboxes frames of another size. It is not saved in scenes: recalling a",
        "look never starts a build.",
        "",
        "## Examples (liblo's `oscsend`)",
        "",
        "```bash",
        'oscsend 127.0.0.1 9000 /prompt s "neon jellyfish"',
        'oscsend 127.0.0.1 9000 /prompt sf "a glowing forest" 4.0     # crossfade over 4 s',
        'oscsend 127.0.0.1 9000 /prompt_blend sfsf "a cat" 1.0 "a dog" 0.5',
        "oscsend 127.0.0.1 9000 /t_index_list ii 20 40",
        "oscsend 127.0.0.1 9000 /resolution ii 768 512                # or: /resolution s 768x512",
        "oscsend 127.0.0.1 9000 /similarity_filter/enabled T",
        "oscsend 127.0.0.1 9000 /preset/save s intro",
        "oscdump 9001                                                 # watch the feedback",
        "```",
        "",
    ]
    return "\n".join(lines)
