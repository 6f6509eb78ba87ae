"""Prompt-embedding and seed-noise blending, linear or spherical (slerp)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.stream.modes import BlendMethod

_PARALLEL_EPS = 1e-6


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors treated as flat vectors.

    ``t`` = 0 gives ``a``, 1 gives ``b``. Nearly parallel inputs fall back to linear
    interpolation. Computed in float32, returned in ``a``'s dtype.
    """
    fa, fb = a.float().flatten(), b.float().flatten()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    if float(sin_theta) < _PARALLEL_EPS:  # parameter-change path, not per frame
        out = (1.0 - t) * fa + t * fb
    else:
        out = (torch.sin((1.0 - t) * theta) * fa + torch.sin(t * theta) * fb) / sin_theta
    return out.reshape(a.shape).to(a.dtype)


def blend_embeddings(
    embeddings: Sequence[torch.Tensor], weights: Sequence[float], method: BlendMethod
) -> torch.Tensor:
    """Mix prompt embeddings ``(1, L, D)`` by weights (normalised to sum 1).

    linear: the weighted mean. slerp: pairwise slerp folding in one embedding at a time,
    each with its share ``w_i / (w_1 + ... + w_i)``.
    """
    _check(embeddings, weights)
    total = float(sum(weights))
    if method is BlendMethod.LINEAR:
        out = sum((w / total) * e.float() for e, w in zip(embeddings, weights))
        assert isinstance(out, torch.Tensor)
        return out.to(embeddings[0].dtype)
    return _fold_slerp(embeddings, weights)


def blend_noise(
    noises: Sequence[torch.Tensor], weights: Sequence[float], method: BlendMethod
) -> torch.Tensor:
    """Mix unit-variance Gaussian noises so the result stays unit-variance.

    linear: ``Σ w_i n_i / sqrt(Σ w_i²)`` (variance-preserving for independent noises).
    slerp: pairwise slerp as ``blend_embeddings`` (norm-preserving on the sphere).
    """
    _check(noises, weights)
    if method is BlendMethod.LINEAR:
        norm = float(sum(w * w for w in weights)) ** 0.5
        out = sum((w / norm) * n.float() for n, w in zip(noises, weights))
        assert isinstance(out, torch.Tensor)
        return out.to(noises[0].dtype)
    return _fold_slerp(noises, weights)


def _fold_slerp(items: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    pairs = [(x, float(w)) for x, w in zip(items, weights) if w > 0]
    result, cumulative = pairs[0]
    for item, weight in pairs[1:]:
        result = slerp(result, item, weight / (cumulative + weight))
        cumulative += weight
    return result


def _check(items: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not items or len(items) != len(weights):
        raise ValueError(f"{len(items)} items and {len(weights)} weights; need equal counts >= 1")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)} must be >= 0 and not all 0")
    if any(x.shape != items[0].shape for x in items):
        raise ValueError("blended tensors must share one shape")


def seeded_noise(
    seeds: Sequence[tuple[int, float]], method: BlendMethod, shape: Sequence[int]
) -> torch.Tensor:
    """Unit-variance noise of ``shape`` from ``(seed, weight)`` pairs (CPU RNG, reproducible on
    any device): one seed's own noise, or several blended with ``blend_noise``."""
    size = tuple(shape)
    noises = [torch.randn(size, generator=torch.Generator("cpu").manual_seed(seed)) for seed, _ in seeds]
    if len(noises) == 1:
        return noises[0]
    return blend_noise(noises, [w for _, w in seeds], method)
