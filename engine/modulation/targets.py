"""Which live parameters a modulator may move: continuous registry values and list items."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.params import MODULATED_ITEM_KINDS, REGISTRY, ParamKind, ParamSpec, modulatable

_TARGET = re.compile(r"(?P<name>[a-z_][a-z0-9_]*)(?:\[(?P<index>\d{1,3})\])?")
_ITEM_KINDS = MODULATED_ITEM_KINDS
_WEIGHT_KINDS = (ParamKind.PROMPT_BLEND, ParamKind.SEED_BLEND)


@dataclass(frozen=True)
class Target:
    """A modulated value: a registry parameter, or item ``index`` of a list / blend (its weight).

    Attributes:
        spec: the registry entry.
        index: the list item (``None``: the parameter itself).
        minimum, maximum: the clamp range (``None``: unbounded on that side).
    """

    spec: ParamSpec
    index: int | None
    minimum: float | None
    maximum: float | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_weight(self) -> bool:
        """Item ``index`` is a blend pair and the weight is what moves."""
        return self.spec.kind in _WEIGHT_KINDS

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


def _scalar(spec: ParamSpec) -> bool:
    return modulatable(spec) and spec.kind is ParamKind.FLOAT


def allowed_targets() -> str:
    """What ``target`` accepts, in words, derived from the registry."""
    scalars = [spec.name for spec in REGISTRY.values() if _scalar(spec)]
    items = [
        f"{spec.name}[i] (i < {spec.max_items})" for spec in REGISTRY.values() if spec.kind in _ITEM_KINDS
    ]
    return ", ".join(scalars + items)


def parse_target(text: str) -> Target:
    """``text`` (``guidance_scale``, ``controlnet_scales[0]``, ``prompt_blend[1]``) as a ``Target``;
    ``ValueError`` naming it and the allowed targets otherwise."""
    match = _TARGET.fullmatch(text) if isinstance(text, str) else None
    spec = REGISTRY.get(match.group("name")) if match else None
    if match is None or spec is None:
        raise ValueError(f"target {text!r:.60} is not a live parameter; allowed: {allowed_targets()}")
    index_text = match.group("index")
    if index_text is None and _scalar(spec):
        return Target(spec, None, spec.minimum, spec.maximum)
    if index_text is not None and spec.kind in _ITEM_KINDS:
        index = int(index_text)
        if spec.max_items is not None and index >= spec.max_items:
            raise ValueError(f"target {text!r} has no item {index}; allowed: {allowed_targets()}")
        if spec.kind in _WEIGHT_KINDS:
            return Target(spec, index, 0.0, None)
        return Target(spec, index, spec.minimum, spec.maximum)
    raise ValueError(f"target {text!r:.60} is not a continuous parameter; allowed: {allowed_targets()}")
