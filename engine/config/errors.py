"""ConfigError and the translation of pydantic errors into one plain line per bad key."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from engine.stream.modes import allowed


class ConfigError(ValueError):
    """A configuration that was refused.

    ``str(error)`` has one line per problem, ``KEY.PATH: message``; ``errors`` holds the
    same as ``(key path, message)`` pairs (the key path is ``""`` for problems of a whole
    file or command line). Every message names the bad value and what is allowed.
    """

    def __init__(self, errors: Sequence[tuple[str, str]] | str) -> None:
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__("\n".join(f"{key}: {msg}" if key else msg for key, msg in self.errors))


class _Problem(ValueError):
    """Raised by our validators: what is wrong, what is allowed, and optionally which sub-key."""

    def __init__(
        self,
        problem: str,
        allowed_text: str | None = None,
        *,
        key: str = "",
        value: Any = None,
        has_value: bool = False,
    ) -> None:
        super().__init__(problem if allowed_text is None else f"{problem}; allowed: {allowed_text}")
        self.problem = problem
        self.allowed_text = allowed_text
        self.key = key
        self.value = value
        self.has_value = has_value


@dataclass(frozen=True)
class _Allowed:
    """Annotated marker: what a field accepts, in words, for error messages."""

    text: str


@dataclass
class _Located:
    """Where a pydantic ``loc`` points in the schema."""

    path: str = ""
    parent: type[BaseModel] | None = None
    leaf: Any = None
    nullable: bool = False
    metadata: list[Any] = field(default_factory=list)


def _unwrap(tp: Any) -> tuple[Any, list[Any], bool]:
    """Strip ``Annotated``/``Optional``: the core type, its metadata, whether None is allowed."""
    metadata: list[Any] = []
    nullable = False
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            tp = args[0]
            for meta in args[1:]:
                metadata.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) < len(get_args(tp)):
                nullable = True
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, metadata, nullable


def _tagged_members(tp: Any) -> dict[str, type[BaseModel]]:
    """``{tag: model}`` when ``tp`` is a union of models told apart by their ``type`` field."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for member in get_args(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            tag_field = member.model_fields.get("type")
            if tag_field is not None and get_origin(tag_field.annotation) is Literal:
                for tag in get_args(tag_field.annotation):
                    members[str(tag)] = member
    return members


def _locate(root: type[BaseModel], loc: Sequence[int | str]) -> _Located:
    """Walk the schema from ``root`` along ``loc``: display path (tags skipped, ``[i]``), leaf type."""
    found = _Located()
    current: Any = root
    for item in loc:
        core, metadata, _ = _unwrap(current)
        if isinstance(item, int) and get_origin(core) is list:
            found.path += f"[{item}]"
            item_type = get_args(core)[0]
            _, item_meta, _ = _unwrap(item_type)
            found.metadata = item_meta + metadata + found.metadata
            current = item_type
            continue
        tagged = _tagged_members(core)
        if tagged and str(item) in tagged:
            current = tagged[str(item)]
            continue
        key = str(item)
        found.path = f"{found.path}.{key}" if found.path else key
        if tagged:  # a key inside a union whose tag we don't know: use the first member having it
            core = next((m for m in tagged.values() if key in m.model_fields), core)
        if isinstance(core, type) and issubclass(core, BaseModel):
            found.parent = core
            info: FieldInfo | None = core.model_fields.get(key)
            current = info.annotation if info is not None else None
            found.metadata = list(info.metadata) if info is not None else []
        else:
            found.parent = None
            current = None
            found.metadata = []
    found.leaf, extra_meta, found.nullable = _unwrap(current)
    found.metadata = found.metadata + extra_meta
    return found


def _fmt(number: Any) -> str:
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


def _allowed_text(found: _Located) -> str | None:
    """What the located key accepts, in words."""
    for meta in found.metadata:
        if isinstance(meta, _Allowed):
            return meta.text
    leaf = found.leaf
    text: str | None = None
    if isinstance(leaf, type) and issubclass(leaf, Enum):
        text = allowed(leaf)
    elif get_origin(leaf) is Literal:
        text = " | ".join(str(a) for a in get_args(leaf))
    elif _tagged_members(leaf):
        text = "a mapping with type: " + " | ".join(_tagged_members(leaf))
    elif isinstance(leaf, type) and issubclass(leaf, BaseModel):
        text = "a mapping with keys: " + ", ".join(leaf.model_fields)
    elif leaf is bool:
        text = "true | false"
    elif leaf in (int, float):
        kind = "an integer" if leaf is int else "a number"
        low: Any = None
        high: Any = None
        low_open = high_open = False
        for meta in found.metadata:
            if isinstance(meta, annotated_types.Ge):
                low = meta.ge
            elif isinstance(meta, annotated_types.Gt):
                low, low_open = meta.gt, True
            elif isinstance(meta, annotated_types.Le):
                high = meta.le
            elif isinstance(meta, annotated_types.Lt):
                high, high_open = meta.lt, True
        if low is not None and high is not None:
            text = f"{kind} in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
        elif low is not None:
            text = f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
        else:
            text = kind
    elif leaf is str:
        longest = next((m.max_length for m in found.metadata if isinstance(m, annotated_types.MaxLen)), None)
        text = "text" if longest is None else f"text of at most {longest} characters"
    elif get_origin(leaf) is list:
        longest = next((m.max_length for m in found.metadata if isinstance(m, annotated_types.MaxLen)), None)
        text = "a list" if longest is None else f"a list of at most {longest} items"
    if text is not None and found.nullable:
        text += " | null"
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PROBLEM_WORDS = {
    "int_type": "is not an integer",
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_type": "is not a number",
    "float_parsing": "is not a number",
    "bool_type": "is not true or false",
    "bool_parsing": "is not true or false",
    "string_type": "is not text",
    "list_type": "is not a list",
    "model_type": "is not a mapping",
    "model_attributes_type": "is not a mapping",
    "dict_type": "is not a mapping",
    "enum": "is not allowed",
    "literal_error": "is not allowed",
    "string_pattern_mismatch": "is not allowed",
    "multiple_of": "is not allowed",
    "greater_than": "is out of range",
    "greater_than_equal": "is out of range",
    "less_than": "is out of range",
    "less_than_equal": "is out of range",
    "finite_number": "is not finite",
    "string_too_long": "is too long",
    "string_too_short": "is too short",
    "too_long": "has too many items",
    "too_short": "has too few items",
}


def _translate_one(root: type[BaseModel], error: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error of validating ``root`` as ``(key path, message)``."""
    kind = error["type"]
    found = _locate(root, error["loc"])
    path = found.path or "config"
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        names = list(found.parent.model_fields) if found.parent is not None else []
        key = path.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return path, f"unknown key{hint}; allowed keys: {', '.join(names)}"
    if kind == "missing":
        allowed_text = _allowed_text(found)
        suffix = f"; allowed: {allowed_text}" if allowed_text else ""
        return path, f"required key is missing{suffix}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = " | ".join(_tagged_members(found.leaf)) or str(ctx.get("expected_tags", ""))
        if kind == "union_tag_not_found":
            return f"{path}.type", f"required key is missing; allowed: {tags}"
        return f"{path}.type", f"{_show(ctx.get('tag'))} is not a known type; allowed: {tags}"
    cause = ctx.get("error")
    if isinstance(cause, _Problem):
        if cause.key:
            path = f"{path}.{cause.key}" if found.path else cause.key
        shown = cause.value if cause.has_value else value
        allowed_text = cause.allowed_text or _allowed_text(found)
        message = f"{_show(shown)} {cause.problem}"
        return path, message if allowed_text is None else f"{message}; allowed: {allowed_text}"
    if cause is not None:
        problem = str(cause)
    else:
        problem = _PROBLEM_WORDS.get(kind, f"is not valid ({error.get('msg', kind)})")
    allowed_text = _allowed_text(found)
    message = f"{_show(value)} {problem}"
    return path, message if allowed_text is None else f"{message}; allowed: {allowed_text}"


def _translate(root: type[BaseModel], error: ValidationError) -> ConfigError:
    """Every pydantic error of validating ``root`` as one ``ConfigError`` (duplicates once)."""
    lines: list[tuple[str, str]] = []
    for item in error.errors():
        line = _translate_one(root, item)
        if line not in lines:
            lines.append(line)
    return ConfigError(lines)


def _type_word(value: Any) -> str:
    return {
        list: "a list",
        str: "text",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)
