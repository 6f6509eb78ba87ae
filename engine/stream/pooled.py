"""SDXL's added conditioning: pooled text embeddings carried as a leading token, and ``add_time_ids``.

A prompt of an SDXL model is held as one tensor ``(1, 1 + L, D)``: row 0 is the pooled
embedding ``(P,)`` zero-padded to ``D``, rows 1.. the text tokens (then any IP-Adapter image
tokens). Everything that treats prompts as tensors — the prompt cache, blends, crossfades, the
CFG layout — therefore handles SDXL unchanged; ``split_pooled`` takes the two apart once per
change, and the UNet gets them as separate inputs (``text_embeds``, ``time_ids``).
"""

from __future__ import annotations

import torch

TIME_IDS = 6  # (original height, original width, crop top, crop left, target height, target width)


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``hidden (1, L, D)`` and ``pooled (1, P)`` (P <= D) → ``(1, 1 + L, D)``."""
    width, size = hidden.shape[-1], pooled.shape[-1]
    if size > width:
        raise ValueError(f"pooled embeddings of {size} values do not fit a token of {width}")
    row = torch.zeros((pooled.shape[0], 1, width), device=hidden.device, dtype=hidden.dtype)
    row[:, 0, :size] = pooled.to(hidden.dtype)
    return torch.cat([row, hidden], dim=1)


def split_pooled(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1 + L, D)`` → tokens ``(B, L, D)`` and pooled ``(B, pooled_dim)``, both contiguous."""
    return packed[:, 1:].contiguous(), packed[:, 0, :pooled_dim].contiguous()


def time_ids(height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``add_time_ids`` ``(batch, 6)`` of an uncropped ``height`` x ``width`` picture, as diffusers'
    SDXL pipelines compute them with ``original_size = target_size = (height, width)``."""
    row = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return row.expand(batch, TIME_IDS).contiguous()
