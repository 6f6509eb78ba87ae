"""The registered UNet extensions, in graph order: what the exporters, runners and pipeline ask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from engine.accel.base import UNetShape
    from engine.extensions.base import Extension, GraphPart
    from engine.models.bundle import ModelBundle
    from engine.stream.modes import CfgType

_REGISTERED: list[type[Extension]] = []
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Register the built-in extensions once, in graph order (their inputs come in this order)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from engine.extensions.controlnet import ControlNet
    from engine.extensions.cross_frame import CrossFrameAttention
    from engine.extensions.feature_cache import FeatureCacheExtension
    from engine.extensions.ip_adapter import IpAdapter
    from engine.extensions.sdxl import AddedConditioning

    builtins = [AddedConditioning, ControlNet, IpAdapter, CrossFrameAttention, FeatureCacheExtension]
    _REGISTERED[:0] = [cls for cls in builtins if cls not in _REGISTERED]


def register(cls: type[Extension]) -> type[Extension]:
    """Add ``cls`` after the ones registered (usable as a class decorator).

    Raises:
        ValueError: another registered extension has its name.
    """
    _load_builtins()
    if cls in _REGISTERED:
        return cls
    taken = {other.name for other in _REGISTERED}
    if not cls.name or cls.name in taken:
        raise ValueError(f"extension name {cls.name!r} is empty or taken; registered: {sorted(taken)}")
    _REGISTERED.append(cls)
    return cls


def unregister(cls: type[Extension]) -> None:
    """Remove ``cls`` (tests; a pipeline that made it keeps its instance)."""
    if cls in _REGISTERED:
        _REGISTERED.remove(cls)


def registered() -> tuple[type[Extension], ...]:
    """The registered extension classes, in graph order."""
    _load_builtins()
    return tuple(_REGISTERED)


def graph_parts(shape: UNetShape | None, models: ModelBundle | None = None) -> list[GraphPart]:
    """The modules of every extension in the UNet graph of ``shape`` (see ``Extension.graph_part``)."""
    parts = []
    for cls in registered():
        part = cls.graph_part(shape, models)
        if part is not None:
            parts.append(part)
    return parts


def identity(shape: UNetShape) -> dict[str, Any]:
    """Every extension's part of the engine cache key of ``shape`` (``options`` included: a graph
    with another extension's inputs is another engine)."""
    out: dict[str, Any] = {"options": repr(shape.options)} if shape.options else {}
    for cls in registered():
        out.update(cls.identity(shape))
    return out


def shape_fields(
    extensions: Iterable[Extension],
    state: Mapping[str, Any],
    n: int,
    cfg_type: CfgType,
    latent_shape: tuple[int, int, int],
) -> dict[str, Any]:
    """What ``extensions`` add to the UNet shape of ``state`` (``UNetShape`` keyword arguments;
    every extension's ``options`` pairs joined)."""
    fields: dict[str, Any] = {}
    options: list[tuple[str, Any]] = []
    for extension in extensions:
        part = dict(extension.shape_fields(state, n, cfg_type, latent_shape))
        options += part.pop("options", ())
        fields.update(part)
    return {**fields, "options": tuple(options)}
