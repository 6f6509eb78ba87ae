"""Reading config.yaml (strict YAML), preset overlays, --set overrides, file lookup and dumping."""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import ValidationError

from engine.config.errors import ConfigError, _locate, _show, _translate, _type_word
from engine.config.schema import SECTIONS, Config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the default ``config.yaml`` and ``presets/`` (repo root when editable)."""

CONFIG_FILENAME = "config.yaml"
PRESETS_DIRNAME = "presets"
MEDIA_DIRNAME = "media"
PRESET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NULL_WORDS = ("null", "Null", "NULL", "~")


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {error.problem}"
    return f"invalid YAML: {error}"


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file as a mapping (empty file → ``{}``); ``ConfigError`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([(str(path), f"{what} not found")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([(str(path), f"cannot read the {what}: {error}")]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError([(str(path), _yaml_problem(error))]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                (
                    str(path),
                    (
                        f"the top level is {_type_word(data)}, not a mapping; "
                        f"allowed: a mapping of sections: {', '.join(SECTIONS)}"
                    ),
                )
            ]
        )
    return data


# --------------------------------------------------------------------------- merging


def merge_config(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overlay`` over ``base`` into a new dict (inputs are left unchanged).

    Mappings merge key by key; anything else (lists included) is replaced. A mapping
    whose ``type`` changes (e.g. ``input: {type: video}`` over a pattern input) is
    replaced whole, so the old variant's keys do not leak into the new one.
    """
    result: dict[str, Any] = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in overlay.items():
        current = result.get(key)
        switches_type = (
            isinstance(current, Mapping)
            and isinstance(value, Mapping)
            and "type" in current
            and "type" in value
            and current["type"] != value["type"]
        )
        if isinstance(current, Mapping) and isinstance(value, Mapping) and not switches_type:
            result[key] = merge_config(current, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate plain data (as read from YAML) into a ``Config``; ``ConfigError`` if refused."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                (
                    "config",
                    (
                        f"{_show(data)} is {_type_word(data)}, not a mapping; "
                        f"allowed: a mapping of sections: {', '.join(SECTIONS)}"
                    ),
                )
            ]
        )
    try:
        return Config.model_validate(dict(data))
    except ValidationError as error:
        raise _translate(Config, error) from None


# --------------------------------------------------------------------------- presets


def default_config_path() -> Path | None:
    """``./config.yaml`` if it exists, else the repository's ``config.yaml``, else ``None``."""
    for candidate in (Path.cwd() / CONFIG_FILENAME, REPO_ROOT / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def presets_dir(config_path: str | os.PathLike[str] | None = None) -> Path:
    """``presets/`` beside the config file used, falling back to the repository's ``presets/``."""
    base = Path(config_path) if config_path is not None else default_config_path()
    if base is not None:
        local = base.parent / PRESETS_DIRNAME
        if local.is_dir():
            return local
    return REPO_ROOT / PRESETS_DIRNAME


def media_dir(config_path: str | os.PathLike[str] | None = None) -> Path:
    """``media/`` (video files a show can switch to) beside the config file used if it exists,
    else beside the presets folder used (``presets_dir``); it may not exist."""
    base = Path(config_path) if config_path is not None else default_config_path()
    if base is not None:
        local = base.parent / MEDIA_DIRNAME
        if local.is_dir():
            return local
    return presets_dir(config_path).parent / MEDIA_DIRNAME


def _preset_dirs(config_path: str | os.PathLike[str] | None) -> list[Path]:
    dirs = [presets_dir(config_path)]
    repo = REPO_ROOT / PRESETS_DIRNAME
    if repo.is_dir() and repo.resolve() != dirs[0].resolve():
        dirs.append(repo)
    return dirs


def list_presets(config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the presets usable with this config (local ``presets/`` first, then the repo's)."""
    names: set[str] = set()
    for folder in _preset_dirs(config_path):
        if folder.is_dir():
            names.update(
                p.stem for p in folder.glob("*.yaml") if p.is_file() and PRESET_NAME_RE.match(p.stem)
            )
    return sorted(names)


def preset_path(name: str, config_path: str | os.PathLike[str] | None = None) -> Path:
    """The file of preset ``name``; ``ConfigError`` for a bad or unknown name."""
    if not isinstance(name, str) or not PRESET_NAME_RE.match(name):
        raise ConfigError(
            [
                (
                    "--preset",
                    (
                        f"{_show(name)} is not a preset name; allowed: a name of 1 to 64 "
                        "letters, digits, '_' or '-' (no paths); available: "
                        f"{', '.join(list_presets(config_path)) or 'none'}"
                    ),
                )
            ]
        )
    for folder in _preset_dirs(config_path):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in _preset_dirs(config_path))
    raise ConfigError(
        [
            (
                "--preset",
                (
                    f"{name!r} not found in {searched}; "
                    f"available: {', '.join(list_presets(config_path)) or 'none'}"
                ),
            )
        ]
    )


# --------------------------------------------------------------------------- overrides


def _parse_value(parts: Sequence[str], raw: str, text: str) -> Any:
    """The value of ``--set``: YAML-typed, but text keys take the text as is (``prompt=yes``)."""
    found = _locate(Config, parts)
    stripped = raw.strip()
    if found.leaf is str:
        if found.nullable and stripped in _NULL_WORDS:
            return None
        if not stripped.startswith(("'", '"')):
            return raw
    if not stripped:
        return ""
    try:
        return yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError([(".".join(parts), f"--set {text!r}: {_yaml_problem(error)}")]) from None


def _split_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(
            [
                (
                    "--set",
                    (f"{_show(text)} has no '='; allowed: KEY=VALUE, e.g. stream.cfg_type=full"),
                )
            ]
        )
    parts = key.strip().split(".")
    if not all(_KEY_RE.match(part) for part in parts):
        raise ConfigError(
            [
                (
                    "--set",
                    (
                        f"{_show(text)} has an empty or malformed key path; "
                        "allowed: KEY=VALUE with a dotted key, e.g. stream.width=256"
                    ),
                )
            ]
        )
    for depth in range(1, len(parts)):
        if get_origin(_locate(Config, parts[:depth]).leaf) is list:
            raise ConfigError(
                [
                    (
                        ".".join(parts[:depth]),
                        (
                            f"is a list: --set {text!r} cannot reach inside it; set the whole "
                            "list, e.g. --set "
                            "'outputs=[{type: preview}, {type: record, path: out/take1.mp4}]'"
                        ),
                    )
                ]
            )
    return parts, _parse_value(parts, raw, text)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` as the nested overlay ``{"a": {"b": value}}``; ``ConfigError`` if malformed."""
    parts, value = _split_override(text)
    overlay: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        overlay = {part: overlay}
    return overlay


# --------------------------------------------------------------------------- public entry points


def load_config(
    path: str | os.PathLike[str] | None = None,
    presets: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> Config:
    """Read a config file, merge presets and ``KEY=VALUE`` overrides in order, and validate.

    ``path`` ``None`` uses ``./config.yaml`` if it exists, else the repository's default
    (and only the schema defaults if neither exists). Presets are looked up in
    ``presets/`` beside that file, then in the repository's ``presets/``.
    Raises ``ConfigError`` naming the file, preset or key path of every problem.
    """
    if isinstance(presets, str):
        presets = [presets]
    if isinstance(overrides, str):
        overrides = [overrides]
    config_path = Path(path) if path is not None else default_config_path()
    if config_path is None:
        logger.debug("no config.yaml found; starting from the schema defaults")
        data: dict[str, Any] = {}
    else:
        data = _read_yaml(config_path, "config file")
        logger.debug("config from %s", config_path)
    for name in presets:
        file = preset_path(name, config_path)
        data = merge_config(data, _read_yaml(file, "preset"))
        logger.debug("preset %s from %s", name, file)
    for text in overrides:
        data = merge_config(data, parse_override(text))
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    """The validated config as YAML (enums as plain strings), loadable again by ``load_config``."""
    return yaml.dump(
        config.model_dump(mode="json"),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=1000,
    )


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing lists of plain values inline (``[35, 45]``) and mappings as blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    inline = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _represent_list)
