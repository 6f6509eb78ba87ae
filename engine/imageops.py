"""Frame conversions on the device: uint8 HWC ↔ float NCHW in [-1, 1], cover-fit resize."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_to_tensor(
    frame: torch.Tensor, height: int, width: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``(h, w, 3|4)`` RGB(A) → ``(1, 3, height, width)`` in [-1, 1].

    Alpha is dropped; a frame of another size is centre-cropped to the target aspect and
    resized (bilinear, antialiased), so any sender resolution works.
    """
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.dtype != torch.uint8:
        raise ValueError(
            f"frame of shape {tuple(frame.shape)} and dtype {frame.dtype}; "
            "expected uint8 (height, width, 3 or 4)"
        )
    image = frame[..., :3].permute(2, 0, 1).unsqueeze(0).to(dtype) / 127.5 - 1.0
    return fit(image, height, width)


def fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``(1, 3, h, w)`` to the aspect of (height, width), then resize to it."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    target_aspect = width / height
    if w / h > target_aspect:
        crop_w = max(1, round(h * target_aspect))
        left = (w - crop_w) // 2
        image = image[..., :, left : left + crop_w]
    else:
        crop_h = max(1, round(w / target_aspect))
        top = (h - crop_h) // 2
        image = image[..., top : top + crop_h, :]
    return F.interpolate(
        image, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )


def upsample(image: torch.Tensor, scale: int) -> torch.Tensor:
    """``(1, C, H, W)`` → ``(1, C, scale·H, scale·W)``, bilinear (``scale`` 1: the same tensor)."""
    if scale == 1:
        return image
    return F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)


def tensor_to_frame(image: torch.Tensor, alpha: bool = True) -> torch.Tensor:
    """``(1, 3, H, W)`` in [-1, 1] → uint8 ``(H, W, 4)`` opaque RGBA or ``(H, W, 3)``."""
    rgb = ((image[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    rgb = rgb.permute(1, 2, 0)
    if not alpha:
        return rgb.contiguous()
    opaque = torch.full_like(rgb[..., :1], 255)
    return torch.cat([rgb, opaque], dim=2)
