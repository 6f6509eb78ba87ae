"""Procedural pictures with captions: the data ``builtin:shapes`` and its judge learn from."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Colour words and their RGB in [0, 1] (each drawing jitters them a little).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.10, 0.20, 0.90),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
COLOR_NAMES = tuple(COLORS)

# What is drawn. "solid" is a plain colour (a colour word alone); shapes sit on a background;
# textures fill the picture with two colours; a gradient runs from one colour to the other.
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("stripes", "checkerboard", "dots", "rings")
PATTERNS = ("solid", *SHAPES, *TEXTURES, "gradient")
STYLES = ("soft", "bright", "dark")

_COLOR_JITTER = 0.06


@dataclass(frozen=True)
class Drawing:
    """What a picture shows: a pattern in colour ``fg`` (on ``bg``) with an optional style word.

    ``bg`` is the background of a shape, the second colour of a texture or the end of a
    gradient; ``None`` for ``solid``. ``bg_named`` says whether the caption names it.
    """

    pattern: str
    fg: str
    bg: str | None = None
    style: str | None = None
    bg_named: bool = True

    @property
    def colors(self) -> tuple[str, ...]:
        """The colour words visible in the picture (foreground first)."""
        return (self.fg,) if self.bg is None else (self.fg, self.bg)


def random_drawing(rng: random.Random) -> Drawing:
    """A random drawing; about one in five is a plain colour, one in four has a style word."""
    pattern = "solid" if rng.random() < 0.2 else rng.choice(PATTERNS[1:])
    fg = rng.choice(COLOR_NAMES)
    style = rng.choice(STYLES) if rng.random() < 0.25 else None
    if pattern == "solid":
        return Drawing(pattern, fg, None, style)
    bg = rng.choice([name for name in COLOR_NAMES if name != fg])
    bg_named = pattern == "gradient" or rng.random() < 0.6
    return Drawing(pattern, fg, bg, style, bg_named)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(drawing: Drawing, rng: random.Random) -> str:
    """One of a few English phrasings of ``drawing`` ("a red circle on a blue background")."""
    fg = drawing.fg if drawing.style is None else f"{drawing.style} {drawing.fg}"
    pattern, bg = drawing.pattern, str(drawing.bg)
    if pattern == "solid":
        return rng.choice([fg, f"{_a(fg)} picture", f"{fg} background", f"all {fg}"])
    if pattern == "gradient":
        return rng.choice([f"{_a(fg)} to {bg} gradient", f"{fg} and {bg} gradient"])
    if pattern in SHAPES:
        if not drawing.bg_named:
            return rng.choice([f"{_a(fg)} {pattern}", f"{fg} {pattern}"])
        return rng.choice([f"{_a(fg)} {pattern} on {_a(bg)} background", f"{_a(fg)} {pattern} on {bg}"])
    if not drawing.bg_named:
        return f"{fg} {pattern}"
    return rng.choice([f"{fg} {pattern} on {_a(bg)} background", f"{fg} and {bg} {pattern}"])


def parse_prompt(prompt: str) -> tuple[tuple[str, ...], str | None]:
    """The colour words (in order) and the first pattern word a prompt names, as the judge reads them.

    ``"a red circle on a blue background"`` → ``(("red", "blue"), "circle")``; ``"red"`` →
    ``(("red",), None)``: a colour alone asks for that colour, whatever the pattern.
    """
    words = prompt.lower().replace(",", " ").split()
    colors = tuple(word for word in words if word in COLORS)
    patterns = [word for word in words if word in PATTERNS]
    return colors, (patterns[0] if patterns else None)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _rgb(name: str, rng: random.Random) -> torch.Tensor:
    base = COLORS[name]
    return torch.tensor(
        [min(1.0, max(0.0, c + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER))) for c in base]
    ).view(3, 1, 1)


def _edge(distance: torch.Tensor, width: float) -> torch.Tensor:
    """1 inside (distance < 0), 0 outside, with a linear ramp ``width`` wide."""
    return (0.5 - distance / width).clamp(0.0, 1.0)


def _mask(pattern: str, size: int, rng: random.Random, edge: float) -> torch.Tensor:
    """Where the foreground colour is, ``(size, size)`` in [0, 1]."""
    x, y = _grid(size)
    if pattern in SHAPES:
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        r = rng.uniform(0.16, 0.32)
        if pattern == "circle":
            distance = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r
        elif pattern == "square":
            distance = torch.maximum((x - cx).abs(), (y - cy).abs()) - 0.85 * r
        else:  # an upright equilateral triangle around (cx, cy)
            h = 1.5 * r
            top, bottom = cy - h * 2 / 3, cy + h / 3
            half = (y - top) / math.sqrt(3.0)
            distance = torch.maximum(torch.maximum(top - y, y - bottom), (x - cx).abs() - half)
        return _edge(distance, edge)
    if pattern == "stripes":
        angle = rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10, 10)
        period = rng.uniform(0.1, 0.3)
        along = x * math.cos(math.radians(angle)) + y * math.sin(math.radians(angle))
        wave = torch.sin(2 * math.pi * (along / period + rng.random()))
        return _edge(-wave * period / (2 * math.pi), edge)
    if pattern == "checkerboard":
        cells = rng.uniform(3.0, 8.0)
        ox, oy = rng.random(), rng.random()
        wave = torch.sin(math.pi * (x * cells + ox)) * torch.sin(math.pi * (y * cells + oy))
        return _edge(-wave / (cells * math.pi), edge)
    if pattern == "dots":
        spacing = rng.uniform(0.12, 0.25)
        radius = spacing * rng.uniform(0.22, 0.38)
        ox, oy = rng.random() * spacing, rng.random() * spacing
        dx = torch.remainder(x + ox, spacing) - spacing / 2
        dy = torch.remainder(y + oy, spacing) - spacing / 2
        return _edge(torch.sqrt(dx**2 + dy**2) - radius, edge)
    if pattern == "rings":
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        period = rng.uniform(0.08, 0.2)
        wave = torch.sin(2 * math.pi * torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) / period)
        return _edge(-wave * period / (2 * math.pi), edge)
    if pattern == "gradient":
        angle = math.radians(rng.uniform(-30, 30))  # runs left (fg) to right (bg), tilted a little
        along = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)
        return (0.5 - along / 0.8).clamp(0.0, 1.0)
    return torch.ones(size, size)  # solid


def _style(image: torch.Tensor, style: str | None) -> torch.Tensor:
    if style == "bright":
        return image * 0.6 + 0.4
    if style == "dark":
        return image * 0.45
    return image


def render(drawing: Drawing, size: int, rng: random.Random) -> torch.Tensor:
    """The picture of ``drawing``: ``(3, size, size)`` float32 in [0, 1] (geometry from ``rng``)."""
    edge = 0.06 if drawing.style == "soft" else 1.5 / size
    mask = _mask(drawing.pattern, size, rng, edge)
    fg = _rgb(drawing.fg, rng)
    bg = fg if drawing.bg is None else _rgb(drawing.bg, rng)
    image = fg * mask + bg * (1.0 - mask)
    return _style(image, drawing.style).clamp(0.0, 1.0)


def smooth_noise(size: int, rng: random.Random) -> torch.Tensor:
    """A photo-like picture unlike the drawings: soft random colour fields with grain, ``(3, s, s)``."""
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    coarse = rng.choice([2, 3, 4, 6, 8, 12])
    field = torch.rand(1, 3, coarse, coarse, generator=generator)
    image = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)[0]
    grain = torch.randn(3, size, size, generator=generator) * rng.uniform(0.0, 0.08)
    return (image + grain).clamp(0.0, 1.0)


def tint(image: torch.Tensor, color: str, rng: random.Random) -> torch.Tensor:
    """``image``'s light and dark in colour ``color``: the restyle a colour-only prompt asks for."""
    luminance = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)
    return (_rgb(color, rng) * (0.45 + 0.55 * luminance)).clamp(0.0, 1.0)
