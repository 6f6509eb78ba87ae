"""The feedback loop: the previous output, transformed on the device, mixed into the next input.

Each frame the previous output ``P`` ``(1, 3, H, W)`` in [-1, 1] is transformed,

    T(P) = clamp(C · G(P), -1, 1)

where ``G`` is one affine resample (zoom, rotate, translate about the picture's centre: ONE
``grid_sample`` on a grid made like ``affine_grid``'s) and ``C`` a 3x3 colour matrix applied per
pixel (a hue rotation about the grey axis, scaled by ``1 - decay``: one small matmul). The mix is

    out = (1 - a) · input + a · T(P)

(``a == 0`` returns ``input`` itself: no op, bit-identical). Every step stays on the device: the
parameters reach the kernels as Python scalars (no host-to-device copy, no synchronize), and the
grid, the colour matrix and the output buffers are cached and remade only when a parameter or the
size changes; per frame only ``grid_sample``'s own output is allocated.

Conventions (all per frame, so they compound into motion):

- ``zoom`` z > 1 zooms in: content at distance r from the centre is seen at z·r (it moves outward,
  a tunnel flying forward); z < 1 zooms out.
- ``rotate`` in degrees, positive = counter-clockwise as seen on screen.
- ``translate`` (tx, ty) in fractions of the width and height; tx > 0 moves content right, ty > 0
  moves it up (as seen on screen).
- ``hue`` in degrees: a rotation of the RGB vector about the grey axis (1, 1, 1); +120 maps red to
  green, green to blue, blue to red. Greys stay grey. (In [-1, 1] values the grey axis goes through
  0 = mid-grey and the rotation is the same as in [0, 1] values.)
- ``decay`` 0..1: the fed-back picture fades toward 0 = mid-grey by that share each frame (it is
  multiplied by ``1 - decay``; mid-grey is the neutral picture of a [-1, 1] VAE).
- Where the resample reaches outside the picture (zoom < 1, rotation, translation) it reads the
  picture mirrored (``grid_sample``'s ``reflection`` padding): an endless, kaleidoscopic tunnel
  with no black edges and no smeared border streaks (``border`` would repeat the edge pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PADDING_MODE = "reflection"
"""What ``grid_sample`` reads outside the picture: mirrored content (see the module docstring)."""

_SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class FeedbackTransform:
    """The per-frame transform of the fed-back picture (see the module docstring for directions).

    Attributes:
        zoom: scale per frame, > 0 (1: none; > 1 zooms in, content moves outward).
        rotate: degrees per frame, counter-clockwise as seen.
        translate: (tx, ty) per frame in fractions of width and height (right, up).
        hue: degrees per frame about the grey axis.
        decay: 0..1, the share by which the picture fades toward mid-grey (0) per frame.
    """

    zoom: float = 1.0
    rotate: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    hue: float = 0.0
    decay: float = 0.0

    @property
    def moves(self) -> bool:
        """Whether the geometric part is anything but the identity."""
        return self.zoom != 1.0 or self.rotate != 0.0 or tuple(self.translate) != (0.0, 0.0)

    @property
    def colours(self) -> bool:
        """Whether the colour part is anything but the identity."""
        return self.hue % 360.0 != 0.0 or self.decay != 0.0

    def theta(self, height: int, width: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The 2x3 matrix ``affine_grid`` would take (``align_corners=False``): for each output
        point in normalised coordinates (x right, y down, -1..1 across the picture) the point of
        the previous picture it shows. Pixels stay square on a non-square picture."""
        if self.zoom <= 0 or not math.isfinite(self.zoom):
            raise ValueError(f"zoom {self.zoom!r} is not allowed; allowed: a number > 0")
        angle = math.radians(self.rotate)
        c, s = math.cos(angle) / self.zoom, math.sin(angle) / self.zoom
        aspect = height / width
        # the inverse of "rotate counter-clockwise (y up as seen), zoom, translate", in pixels,
        # conjugated into normalised coordinates: diag(2/W, 2/H) · R^T · diag(W/2, H/2) / z
        m00, m01, m10, m11 = c, -s * aspect, s / aspect, c
        tx, ty = 2.0 * self.translate[0], -2.0 * self.translate[1]  # normalised, y down
        return (m00, m01, -(m00 * tx + m01 * ty)), (m10, m11, -(m10 * tx + m11 * ty))

    def colour_matrix(self) -> tuple[tuple[float, ...], ...]:
        """The 3x3 matrix (rows: output R, G, B) of the colour part: ``(1 - decay)`` times the
        rotation by ``hue`` about the grey axis (Rodrigues' formula with k = (1, 1, 1)/√3)."""
        a, b, p = self.colour_terms()
        return tuple(tuple(a * _IDENTITY[i][j] + b * _SKEW[i][j] + p for j in range(3)) for i in range(3))

    def colour_terms(self) -> tuple[float, float, float]:
        """``(1-d)·cos h``, ``(1-d)·sin h / √3`` and ``(1-d)(1 - cos h)/3``: the weights of the
        identity, the skew matrix ``_SKEW`` and the all-ones matrix."""
        keep = 1.0 - self.decay
        angle = math.radians(self.hue)
        return keep * math.cos(angle), keep * math.sin(angle) / _SQRT3, keep * (1.0 - math.cos(angle)) / 3.0


_SKEW = ((0.0, -1.0, 1.0), (1.0, 0.0, -1.0), (-1.0, 1.0, 0.0))
"""√3 · [k]×, the cross-product matrix of the grey axis k = (1, 1, 1)/√3."""
_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
_ONES = ((1.0, 1.0, 1.0),) * 3


@dataclass
class _Buffers:
    """What ``Feedback`` keeps for one picture shape, device and dtype."""

    key: tuple[tuple[int, ...], torch.device, torch.dtype]
    base: torch.Tensor  # (2, H, W) float32: affine_grid's identity grid (x, then y)
    grid32: torch.Tensor  # (1, H, W, 2) float32: the grid of the cached parameters
    grid: torch.Tensor  # (1, H, W, 2) in the picture's dtype (grid_sample needs it); grid32 when float32
    constants: torch.Tensor  # (3, 3, 3) float32: I, √3·[k]× and the all-ones matrix
    matrix32: torch.Tensor  # (3, 3) float32: the colour matrix of the cached parameters
    matrix: torch.Tensor  # (3, 3) in the picture's dtype; matrix32 when float32
    coloured: torch.Tensor  # (1, 3, H, W): the colour part's output
    mixed: torch.Tensor  # (1, 3, H, W): the mix's output
    grid_params: tuple[float, ...] | None = None
    colour_params: tuple[float, ...] | None = None

    @classmethod
    def make(cls, picture: torch.Tensor) -> _Buffers:
        height, width = picture.shape[-2:]
        device, dtype, f32 = picture.device, picture.dtype, torch.float32
        xs = torch.linspace(-1.0 + 1.0 / width, 1.0 - 1.0 / width, width, device=device, dtype=f32)
        ys = torch.linspace(-1.0 + 1.0 / height, 1.0 - 1.0 / height, height, device=device, dtype=f32)
        base = torch.stack((xs.expand(height, width), ys[:, None].expand(height, width)))
        grid32 = torch.empty((1, height, width, 2), device=device, dtype=f32)
        constants = torch.tensor((_IDENTITY, _SKEW, _ONES), dtype=f32).to(device)  # once per size
        matrix32 = torch.empty((3, 3), device=device, dtype=f32)
        return cls(
            key=(tuple(picture.shape), device, dtype),
            base=base,
            grid32=grid32,
            grid=grid32 if dtype == f32 else torch.empty_like(grid32, dtype=dtype),
            constants=constants,
            matrix32=matrix32,
            matrix=matrix32 if dtype == f32 else torch.empty_like(matrix32, dtype=dtype),
            coloured=torch.empty_like(picture, memory_format=torch.contiguous_format),
            mixed=torch.empty_like(picture, memory_format=torch.contiguous_format),
        )


class Feedback:
    """The feedback transform and mix, with their cached device buffers.

    ``mix(image, previous, amount, transform)`` gives this frame's input; ``transform(previous,
    transform)`` the transformed previous output alone (txt2img). The buffers belong to one size,
    device and dtype and are made again when any of them changes (a resolution change); ``reset()``
    lets them go.
    """

    def __init__(self) -> None:
        self._buffers: _Buffers | None = None

    def reset(self) -> None:
        """Let the cached buffers go (they are made again at the next use)."""
        self._buffers = None

    @torch.no_grad()
    def transform(self, previous: torch.Tensor, transform: FeedbackTransform) -> torch.Tensor:
        """``T(previous)``: the geometric resample, then the colour matrix, clamped to [-1, 1].

        Args:
            previous: the previous output ``(1, 3, H, W)`` in [-1, 1], float (the pipeline's
                device and dtype); never written to.
            transform: this frame's parameters.

        Returns:
            ``(1, 3, H, W)``, same device and dtype: ``previous`` itself when the transform is the
            identity, else ``grid_sample``'s output or a cached buffer (valid until the next call).
        """
        if previous.dim() != 4 or tuple(previous.shape[:2]) != (1, 3) or not previous.is_floating_point():
            raise ValueError(
                f"previous output of shape {tuple(previous.shape)} and dtype {previous.dtype}; "
                "expected a float tensor (1, 3, H, W)"
            )
        if not transform.moves and not transform.colours:
            return previous
        buffers = self._prepare(previous)
        moved = previous
        if transform.moves:
            moved = F.grid_sample(
                previous,
                self._grid_for(buffers, transform),
                mode="bilinear",
                padding_mode=PADDING_MODE,
                align_corners=False,
            )
        if not transform.colours:
            return moved  # bilinear weights are convex: still in [-1, 1]
        out = buffers.coloured
        torch.matmul(self._matrix_for(buffers, transform), moved.reshape(3, -1), out=out.view(3, -1))
        return out.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def mix(
        self, image: torch.Tensor, previous: torch.Tensor, amount: float, transform: FeedbackTransform
    ) -> torch.Tensor:
        """``(1 - amount) · image + amount · T(previous)``.

        Args:
            image: this frame's input ``(1, 3, H, W)`` in [-1, 1], float; never written to.
            previous: the previous output, the same shape, device and dtype.
            amount: 0..1; 0 returns ``image`` itself (no op), 1 returns ``T(previous)``.
            transform: this frame's parameters.

        Returns:
            ``(1, 3, H, W)`` in [-1, 1], same device and dtype; a cached buffer (valid until the
            next call) unless ``amount`` is 0 or 1.
        """
        if amount == 0.0:
            return image
        if previous.shape != image.shape or previous.dtype != image.dtype:
            raise ValueError(
                f"previous output {tuple(previous.shape)} {previous.dtype}; expected the input's "
                f"{tuple(image.shape)} {image.dtype}"
            )
        fed = self.transform(previous, transform)
        if amount == 1.0:
            return fed
        return torch.lerp(image, fed, float(amount), out=self._prepare(image).mixed)

    # ------------------------------------------------------------------ caches
    def _prepare(self, picture: torch.Tensor) -> _Buffers:
        """The buffers for ``picture``'s shape, device and dtype (made when those changed)."""
        buffers = self._buffers
        if buffers is None or buffers.key != (tuple(picture.shape), picture.device, picture.dtype):
            buffers = self._buffers = _Buffers.make(picture)
        return buffers

    @staticmethod
    def _grid_for(buffers: _Buffers, transform: FeedbackTransform) -> torch.Tensor:
        """The sampling grid ``(1, H, W, 2)`` of ``transform``: equal to ``F.affine_grid(theta,
        (1, 3, H, W), align_corners=False)``, but made from the cached identity grid with theta's
        entries as kernel scalars (no host-to-device copy, so no stream synchronize when a
        modulator moves a parameter every frame), and only when they change."""
        params = (transform.zoom, transform.rotate, *transform.translate)
        if params == buffers.grid_params:
            return buffers.grid
        height, width = buffers.key[0][-2:]
        base_x, base_y = buffers.base[0], buffers.base[1]
        for axis, (a, b, c) in enumerate(transform.theta(height, width)):
            buffers.grid32[0, :, :, axis].copy_(base_x).mul_(a).add_(base_y, alpha=b).add_(c)
        if buffers.grid is not buffers.grid32:
            buffers.grid.copy_(buffers.grid32)
        buffers.grid_params = params
        return buffers.grid

    @staticmethod
    def _matrix_for(buffers: _Buffers, transform: FeedbackTransform) -> torch.Tensor:
        """The colour matrix ``(3, 3)`` of ``transform`` on the device, a weighted sum of the cached
        constant matrices (scalar weights: no host-to-device copy), made only when hue or decay
        change."""
        params = (transform.hue, transform.decay)
        if params == buffers.colour_params:
            return buffers.matrix
        a, b, p = transform.colour_terms()
        identity, skew, ones = buffers.constants
        torch.mul(identity, a, out=buffers.matrix32)
        buffers.matrix32.add_(skew, alpha=b).add_(ones, alpha=p)
        if buffers.matrix is not buffers.matrix32:
            buffers.matrix.copy_(buffers.matrix32)
        buffers.colour_params = params
        return buffers.matrix
