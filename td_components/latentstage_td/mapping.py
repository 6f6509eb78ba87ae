"""Registry names <-> TouchDesigner custom parameter names, and par values <-> OSC arguments.

Pure logic, standard library only, Python 3.9+ (TouchDesigner 2022 builds ship 3.9, 2023+
3.11). The builder inlines this file into the component as the Text DAT ``mapping``; tests
import it as ``latentstage_td.mapping``. The registry arrives as the plain data of
``engine.params.as_json()`` (``td_components/params.json``), never as the engine package.

TD naming rule: a custom parameter name is one uppercase letter followed by lowercase letters
and digits only. A registry name becomes its TD name by dropping everything but letters and
digits, lowercasing, and capitalising the first letter (``guidance_scale`` -> ``Guidancescale``,
``similarity_filter_max_skip_frames`` -> ``Similarityfiltermaxskipframes``); a name starting
with a digit gets a leading ``P``. Exceptions go in ``TD_NAME_OVERRIDES``. ``ParamMap`` refuses
any collision, with another registry entry or with one of the component's own pars.
"""

from __future__ import annotations

import math
import re
from typing import Any

TD_NAME = re.compile(r"^[A-Z][a-z0-9]*$")
#: The engine's longest accepted text (``engine.params.MAX_PROMPT_CHARS``); it re-checks anyway.
MAX_TEXT = 2000
MAX_CROSSFADE_S = 60.0
MAX_SEED = 2**31 - 1
#: Echoes come back as OSC float32: values this close are the same value.
REL_TOLERANCE = 1e-5
ABS_TOLERANCE = 1e-6

#: Registry name -> TD name where the rule would collide or read badly (none needed today).
TD_NAME_OVERRIDES: dict[str, str] = {}

PAGES = (
    "Stream",
    "Guidance",
    "Similarity filter",
    "Feature cache",
    "Conditioning",
    "Scene",
    "Tempo",
    "Engine",
    "Bridges",
    "Status",
)
PAGE_BY_NAME = {"guidance_scale": "Guidance", "delta": "Guidance", "cfg_type": "Guidance"}
PAGE_BY_GROUP = {
    "stream": "Stream",
    "similarity_filter": "Similarity filter",
    "scene": "Scene",
    "runtime": "Engine",
    "control": "Engine",
    "conditioning": "Conditioning",
    "feature_cache": "Feature cache",
    "tempo": "Tempo",
    "modulation": "Tempo",
    "sequence": "Tempo",
}
LABELS = {
    "t_index_list": "T index list",
    "cfg_type": "CFG type",
    "resolution": "Resolution WxH",
    "preset_load": "Load preset",
    "preset_save": "Save preset",
    "status": "Request status",
    "bpm": "BPM",
    "tempo_tap": "Tap tempo",
    "tempo_resync": "Resync (downbeat now)",
    "quantize_offset_ms": "Quantize offset (ms)",
    "modulators": "Modulators (YAML)",
    "sequence": "Prompt sequence (YAML)",
}
#: Registry type -> the TD par style (the suffix of ``page.appendX``).
STYLE_BY_TYPE = {
    "float": "Float",
    "int": "Int",
    "bool": "Toggle",
    "string": "Str",
    "enum": "Menu",
    "int_list": "Str",
    "float_list": "Str",
    "prompt_blend": "Str",
    "seed_blend": "Str",
    "size": "Str",
    "action": "Pulse",
}
#: Bridge kinds the component can start the engine with ("config": leave the config file's).
BRIDGE_TYPES = ("config", "spout", "syphon", "ndi", "shm")
#: The config key that names the peer of an engine input of that type.
INPUT_NAME_KEY = {"spout": "sender", "syphon": "server", "ndi": "source", "shm": "name"}


class ParDef:
    """One custom parameter of the component: from the registry (``registry`` set) or its own."""

    __slots__ = (
        "choices",
        "default",
        "label",
        "maximum",
        "minimum",
        "name",
        "page",
        "position",
        "read_only",
        "registry",
        "style",
    )

    def __init__(
        self,
        name: str,
        style: str,
        page: str,
        label: str,
        default: Any = None,
        minimum: float | None = None,
        maximum: float | None = None,
        choices: tuple[str, ...] = (),
        read_only: bool = False,
        position: str = "end",
        registry: str | None = None,
    ) -> None:
        self.name = name
        self.style = style
        self.page = page
        self.label = label
        self.default = default
        self.minimum = minimum
        self.maximum = maximum
        self.choices = tuple(choices)
        self.read_only = read_only
        #: "start", "end" (of its page) or the registry name it follows
        self.position = position
        self.registry = registry

    def norm_range(self) -> tuple[float, float] | None:
        """The slider range: the bounds, shortened for huge int ranges (seed: 0..1000)."""
        if self.minimum is None or self.maximum is None:
            return None
        if self.style == "Int" and self.maximum - self.minimum > 1000:
            return self.minimum, self.minimum + 1000
        return self.minimum, self.maximum

    def __repr__(self) -> str:
        return f"ParDef({self.name!r}, {self.style!r}, page={self.page!r})"


def _component_pars(platform: str) -> tuple[ParDef, ...]:
    """The component's own pars: prompt crossfade, scene name, process, bridges, status."""
    bridge = "spout" if platform.startswith("win") else "syphon" if platform == "darwin" else "config"
    return (
        ParDef(
            "Crossfade",
            "Float",
            "Stream",
            "Prompt crossfade (s)",
            0.0,
            0.0,
            MAX_CROSSFADE_S,
            position="prompt",
        ),
        ParDef("Presetname", "Str", "Scene", "Preset name", "", position="start"),
        ParDef("Executable", "File", "Engine", "latentstage executable", "", position="start"),
        ParDef("Configfile", "File", "Engine", "Config file", "", position="start"),
        ParDef("Preset", "Str", "Engine", "Preset(s)", "", position="start"),
        ParDef("Workdir", "Folder", "Engine", "Working folder", "", position="start"),
        ParDef("Logfile", "File", "Engine", "Log file", "", position="start"),
        ParDef("Oschost", "Str", "Engine", "Engine address", "127.0.0.1", position="start"),
        ParDef("Oscport", "Int", "Engine", "OSC port", 9000, 1, 65535, position="start"),
        ParDef("Feedbackport", "Int", "Engine", "Feedback port", 9001, 1, 65535, position="start"),
        ParDef(
            "Onconnect",
            "Menu",
            "Engine",
            "On connect",
            "pull",
            choices=("pull", "push", "none"),
            position="start",
        ),
        ParDef("Autostart", "Toggle", "Engine", "Start with the project", False, position="start"),
        ParDef("Autorestart", "Toggle", "Engine", "Restart if it exits", False, position="start"),
        ParDef("Start", "Pulse", "Engine", "Start", position="start"),
        ParDef("Stop", "Pulse", "Engine", "Stop", position="start"),
        ParDef("Restart", "Pulse", "Engine", "Restart", position="start"),
        ParDef("Pushall", "Pulse", "Engine", "Send all values"),
        ParDef("Paramsjson", "File", "Engine", "params.json (optional)", ""),
        ParDef("Inputtype", "Menu", "Bridges", "Engine input", bridge, choices=BRIDGE_TYPES),
        ParDef("Inputname", "Str", "Bridges", "Input sender/source", "TDSyphonSpoutOut"),
        ParDef("Outputtype", "Menu", "Bridges", "Engine output", bridge, choices=BRIDGE_TYPES),
        ParDef("Outputname", "Str", "Bridges", "Output sender name", "latentstage"),
        ParDef("Ndisource", "Str", "Bridges", "NDI source to receive", ""),
        ParDef("State", "Str", "Status", "State", "stopped", read_only=True),
        ParDef("Fps", "Float", "Status", "Frames per second", 0.0, read_only=True),
        ParDef("Latencyms", "Float", "Status", "Latency (ms)", 0.0, read_only=True),
        ParDef("Skiprate", "Float", "Status", "Skip rate", 0.0, read_only=True),
        ParDef("Building", "Str", "Status", "Building engines", "", read_only=True),
        ParDef("Changelatencyms", "Float", "Status", "Change to screen (ms)", 0.0, read_only=True),
        ParDef("Enginebpm", "Float", "Status", "Tempo (BPM)", 0.0, read_only=True),
        ParDef("Beat", "Int", "Status", "Beat in the bar", 0, 0, 32, read_only=True),
        ParDef("Sequencestep", "Int", "Status", "Sequence step (-1: off)", -1, -1, 64, read_only=True),
        ParDef("Midi", "Str", "Status", "MIDI controllers", "", read_only=True),
        ParDef("Restarts", "Int", "Status", "Supervisor restarts", 0, 0, 1000, read_only=True),
        ParDef("Replicas", "Int", "Status", "Replicas playing", 1, 0, 8, read_only=True),
        ParDef("Lasterror", "Str", "Status", "Last error", "", read_only=True),
    )


COMPONENT_PAR_NAMES = tuple(p.name for p in _component_pars(""))
#: Pars whose change re-wires the OSC DATs and the bridge TOPs.
WIRING_PARS = (
    "Oschost",
    "Oscport",
    "Feedbackport",
    "Inputtype",
    "Inputname",
    "Outputtype",
    "Outputname",
    "Ndisource",
)
STATUS_PARS = (
    "State",
    "Fps",
    "Latencyms",
    "Skiprate",
    "Building",
    "Changelatencyms",
    "Enginebpm",
    "Beat",
    "Sequencestep",
    "Midi",
    "Restarts",
    "Replicas",
    "Lasterror",
)


def td_name(name: str) -> str:
    """The TD custom par name of a registry name (the rule in the module docstring)."""
    if name in TD_NAME_OVERRIDES:
        return TD_NAME_OVERRIDES[name]
    letters = re.sub(r"[^a-z0-9]", "", name.lower())
    if not letters:
        raise ValueError(f"registry name {name!r} has no letters or digits for a TD name")
    if letters[0].isdigit():
        letters = "p" + letters
    return letters[0].upper() + letters[1:]


def label(entry: dict[str, Any]) -> str:
    """A short label: ``similarity_filter_threshold`` on its own page reads ``Threshold``."""
    name = entry["name"]
    if name in LABELS:
        return LABELS[name]
    group = entry.get("group") or ""
    if group and name.startswith(group + "_"):
        name = name[len(group) + 1 :]
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


def pulsed(entry: dict[str, Any]) -> bool:
    """Whether an entry gets a par: every value, and the actions a Pulse can send (no argument, an
    optional one, or a scene's name: the Presetname par); ``/mod/depth i f`` and the like are for
    scripts and controllers."""
    args = entry.get("osc_args") or ""
    return entry["type"] != "action" or not args or args.startswith("[") or entry.get("group") == "scene"


def page(entry: dict[str, Any]) -> str:
    return PAGE_BY_NAME.get(entry["name"]) or PAGE_BY_GROUP.get(entry.get("group") or "", "Stream")


class ParamMap:
    """The registry as TD pars: names both ways, OSC addresses, the pars to build.

    Raises ``ValueError`` when a TD name is invalid or collides (the fix is an entry in
    ``TD_NAME_OVERRIDES``).
    """

    def __init__(self, entries: list[dict[str, Any]], platform: str = "") -> None:
        self.entries = [dict(e) for e in entries if pulsed(e)]
        self.component = _component_pars(platform)
        self.by_name: dict[str, dict[str, Any]] = {}
        self.td_of: dict[str, str] = {}
        self.entry_of_td: dict[str, dict[str, Any]] = {}
        self.by_address: dict[str, dict[str, Any]] = {}
        owner = {p.name: "the component's own par" for p in self.component}
        for entry in self.entries:
            name = entry["name"]
            td = td_name(name)
            if not TD_NAME.match(td):
                raise ValueError(f"TD name {td!r} of {name!r} breaks the rule Uppercase + lowercase/digits")
            if td in owner:
                raise ValueError(
                    f"TD name {td!r} of {name!r} collides with {owner[td]}; add an entry to TD_NAME_OVERRIDES"
                )
            owner[td] = f"registry entry {name!r}"
            self.by_name[name] = entry
            self.td_of[name] = td
            self.entry_of_td[td] = entry
            for address in [entry["osc_address"], *(entry.get("aliases") or [])]:
                self.by_address[address] = entry

    def registry_par(self, entry: dict[str, Any]) -> ParDef:
        kind = entry["type"]
        style = STYLE_BY_TYPE.get(kind, "Str")
        return ParDef(
            self.td_of[entry["name"]],
            style,
            page(entry),
            label(entry),
            default_value(entry),
            entry.get("min"),
            entry.get("max"),
            tuple(entry.get("choices") or ()),
            registry=entry["name"],
        )

    def pars(self) -> list[ParDef]:
        """Every par in build order: page by page; own pars at the start, after their entry, or at the end."""
        registry = [self.registry_par(e) for e in self.entries]
        ordered: list[ParDef] = []
        for name in PAGES:
            ordered += [p for p in self.component if p.page == name and p.position == "start"]
            for par in registry:
                if par.page == name:
                    ordered.append(par)
                    ordered += [p for p in self.component if p.position == par.registry]
            ordered += [p for p in self.component if p.page == name and p.position == "end"]
        ordered += [p for p in registry if p.page not in PAGES]
        return ordered

    def control_pars(self) -> list[str]:
        """The pars the Parameter Execute DAT watches (everything but the Status page)."""
        return [p.name for p in self.pars() if p.page != "Status"]


def default_value(entry: dict[str, Any]) -> Any:
    """The TD par value of the registry default (``None`` defaults get a neutral value)."""
    kind = entry["type"]
    value = entry.get("default")
    if kind == "action":
        return None
    if value is None:
        if kind == "float":
            low, high = entry.get("min"), entry.get("max")
            return (low + high) / 2.0 if low is not None and high is not None else 0.0
        return {"int": 0, "bool": False}.get(kind, "")
    if kind in ("int_list", "float_list"):
        return " ".join(str(v) for v in value)
    if kind == "size":
        return "x".join(str(v) for v in value)
    return value


# ----------------------------------------------------------------------------- values


def _refuse(entry: dict[str, Any], why: str) -> ValueError:
    allowed = entry.get("allowed") or ""
    return ValueError(f"{entry['name']}: {why}" + (f"; allowed: {allowed}" if allowed else ""))


def _number(entry: dict[str, Any], value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _refuse(entry, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(entry, f"{value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise _refuse(entry, f"{value!r} is not finite")
    _check_range(entry, number, repr(value))
    return number


def _check_range(entry: dict[str, Any], number: float, shown: str) -> None:
    low, high = entry.get("min"), entry.get("max")
    if (low is not None and number < low) or (high is not None and number > high):
        raise _refuse(entry, f"{shown} is out of range")


def _whole(entry: dict[str, Any], text: str) -> int:
    try:
        number = float(text)
    except ValueError:
        raise _refuse(entry, f"{text!r} is not an integer") from None
    if not math.isfinite(number) or not number.is_integer():
        raise _refuse(entry, f"{text!r} is not an integer")
    return int(number)


def _switch(entry: dict[str, Any], value: Any) -> bool:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "on"):
            return True
        if word in ("0", "false", "off"):
            return False
        raise _refuse(entry, f"{value!r} is not a switch")
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise _refuse(entry, f"{value!r} is not a switch")


def _text(entry: dict[str, Any], value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_TEXT:
        raise _refuse(entry, f"text of {len(text)} characters is too long")
    return text


def _tokens(value: Any) -> list[str]:
    """A list par as written in TD (``"1 0.5"``, ``"1, 0.5"``, ``"[1, 0.5]"``) or a list -> strings."""
    if isinstance(value, str):
        return re.sub(r"[\[\]\(\),;]", " ", value).split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def parse_float_list(entry: dict[str, Any], value: Any) -> list[float]:
    """``"1 0.5"``, ``"1, 0.5"`` or a list -> checked floats (count and range)."""
    tokens = _tokens(value)
    items = []
    for token in tokens:
        try:
            number = float(token)
        except ValueError:
            raise _refuse(entry, f"{token!r} is not a number") from None
        if not math.isfinite(number):
            raise _refuse(entry, f"{token!r} is not finite")
        items.append(number)
    least, most = entry.get("min_items") or 1, entry.get("max_items") or 16
    if not least <= len(items) <= most:
        raise _refuse(entry, f"{len(items)} numbers given")
    for item in items:
        _check_range(entry, item, str(item))
    return items


def parse_int_list(entry: dict[str, Any], value: Any) -> list[int]:
    """``"32 45"``, ``"32,45"``, ``"[32, 45]"`` or a list -> checked, strictly increasing ints."""
    tokens = _tokens(value)
    items = [_whole(entry, token) for token in tokens]
    most = entry.get("max_items") or 8
    if not 1 <= len(items) <= most:
        raise _refuse(entry, f"{len(items)} numbers given")
    for item in items:
        _check_range(entry, item, str(item))
    if any(items[i + 1] <= items[i] for i in range(len(items) - 1)):
        raise _refuse(entry, f"{items} is not strictly increasing")
    return items


def parse_size(entry: dict[str, Any], value: Any) -> list[int]:
    """``"768x512"``, ``"768 512"``, ``"768, 512"`` or a pair -> checked ``[width, height]``."""
    text = value if isinstance(value, str) else " ".join(str(v) for v in _tokens(value))
    items = [_whole(entry, token) for token in _tokens(re.sub(r"[xX*]", " ", text))]
    if len(items) != 2:
        raise _refuse(entry, f"{len(items)} numbers given")
    for item in items:
        _check_range(entry, item, str(item))
        if item % 8:
            raise _refuse(entry, f"{item} is not a multiple of 8")
    return items


def _weight(entry: dict[str, Any], text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise _refuse(entry, f"weight {text!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise _refuse(entry, f"weight {text!r} is not >= 0")
    return weight


def _check_pairs(entry: dict[str, Any], pairs: list[Any]) -> None:
    most = entry.get("max_items") or 8
    if not 1 <= len(pairs) <= most:
        raise _refuse(entry, f"{len(pairs)} pairs given")
    if sum(weight for _, weight in pairs) <= 0:
        raise _refuse(entry, "weights are all 0")


def parse_prompt_blend(entry: dict[str, Any], text: str) -> list[tuple[str, float]]:
    """``"a cat:1 | a dog:0.5"`` -> pairs; a missing ``:weight`` means 1 (``|`` separates)."""
    pairs = []
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        prompt, sep, weight = part.rpartition(":")
        if sep and re.fullmatch(r"\s*[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?\s*", weight):
            pairs.append((_text(entry, prompt.strip()), _weight(entry, weight)))
        else:
            pairs.append((_text(entry, part), 1.0))
    _check_pairs(entry, pairs)
    return pairs


def parse_seed_blend(entry: dict[str, Any], text: str) -> list[tuple[int, float]]:
    """``"1:0.5, 2:0.5"`` (or space/``|`` separated) -> pairs; a missing ``:weight`` means 1."""
    pairs = []
    for part in re.split(r"[,|\s]+", text.strip()):
        if not part:
            continue
        seed_text, _, weight = part.partition(":")
        seed = _whole(entry, seed_text)
        if not 0 <= seed <= MAX_SEED:
            raise _refuse(entry, f"seed {seed} is out of range")
        pairs.append((seed, _weight(entry, weight) if weight else 1.0))
    _check_pairs(entry, pairs)
    return pairs


def osc_args(entry: dict[str, Any], value: Any, crossfade: Any = None) -> list[Any] | None:
    """A TD par value as the OSC arguments of ``entry``'s address.

    Raises ``ValueError`` naming the parameter and what is allowed when the value is refused
    (the same range/choices the engine checks); returns ``None`` when there is nothing to send
    (an empty blend). ``crossfade`` seconds > 0 ride along as the prompt's second argument.
    """
    kind = entry["type"]
    if kind == "float":
        return [_number(entry, value)]
    if kind == "int":
        number = _number(entry, value)
        if not number.is_integer():
            raise _refuse(entry, f"{value!r} is not a whole number")
        return [int(number)]
    if kind == "bool":
        return [1 if _switch(entry, value) else 0]
    if kind == "enum":
        text = str(value)
        if text not in (entry.get("choices") or ()):
            raise _refuse(entry, f"{text!r} is not allowed")
        return [text]
    if kind == "string":
        args: list[Any] = [_text(entry, value)]
        if crossfade is not None and "[f]" in (entry.get("osc_args") or ""):
            seconds = float(crossfade)
            if not 0.0 <= seconds <= MAX_CROSSFADE_S:
                raise ValueError(
                    f"crossfade: {crossfade!r} is out of range; allowed: 0..{MAX_CROSSFADE_S:g} s"
                )
            if seconds > 0:
                args.append(seconds)
        return args
    if kind == "int_list":
        return list(parse_int_list(entry, value))
    if kind == "size":
        return parse_size(entry, value)
    if kind == "float_list":
        if isinstance(value, str) and not value.strip():
            return None
        return list(parse_float_list(entry, value))
    if kind in ("prompt_blend", "seed_blend"):
        text = str(value or "").strip()
        if not text:
            return None
        pairs: list[Any] = (
            parse_prompt_blend(entry, text) if kind == "prompt_blend" else parse_seed_blend(entry, text)
        )
        return [item for pair in pairs for item in pair]
    if kind == "action":
        if not entry.get("osc_args") or entry["osc_args"].startswith("["):
            return []
        name = str(value or "").strip()
        if not name:
            raise _refuse(entry, "no name given")
        return [name]
    return [value]  # a kind this component does not know yet: the engine validates it


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def td_value(entry: dict[str, Any], args: list[Any]) -> Any:
    """The TD par value of an echo's OSC arguments (``ValueError`` when they do not fit)."""
    kind = entry["type"]
    if kind == "size":
        if len(args) != 2:
            raise ValueError(f"{entry['name']}: echo of {len(args)} values; expected width and height")
        return f"{int(args[0])}x{int(args[1])}"
    if kind in ("int_list", "float_list", "prompt_blend", "seed_blend"):
        if kind == "int_list":
            return " ".join(str(int(a)) for a in args)
        if kind == "float_list":
            return " ".join(_fmt(a) for a in args)
        pairs = list(zip(args[0::2], args[1::2]))
        if kind == "prompt_blend":
            return " | ".join(f"{p}:{_fmt(w)}" for p, w in pairs)
        return ", ".join(f"{int(s)}:{_fmt(w)}" for s, w in pairs)
    if not args:
        raise ValueError(f"{entry['name']}: echo without a value")
    value = args[0]
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return value if isinstance(value, str) else str(value)


def canonical(entry: dict[str, Any], value: Any) -> list[Any]:
    """A comparable form of a par value (its OSC arguments, or the raw text if refused)."""
    try:
        args = osc_args(entry, value)
    except (ValueError, TypeError):
        return ["raw", str(value)]
    return [] if args is None else args


def same_args(a: list[Any], b: list[Any]) -> bool:
    """Equal OSC argument lists, floats compared with the float32 tolerance of an echo."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            if not math.isclose(float(x), float(y), rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE):
                return False
        elif x != y:
            return False
    return True


def same_value(entry: dict[str, Any], a: Any, b: Any) -> bool:
    """Whether two TD par values mean the same (``"32,45"`` == ``"32 45"``, 1.6 == float32 1.6)."""
    return same_args(canonical(entry, a), canonical(entry, b))


def ndi_stream_name(source: str) -> str:
    """``"HOST (Stream)"`` -> ``"Stream"`` (what an NDI Out TOP is named); other text unchanged."""
    match = re.fullmatch(r"\s*.*?\((.+)\)\s*", source)
    return match.group(1).strip() if match else source.strip()
