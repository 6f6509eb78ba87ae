"""The UNet with its extensions' graph parts as one module: what every backend runs and exports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engine.extensions.base import GraphPart, UNetCall


class ConditionedUNet(nn.Module):
    """``UNet(latents, timesteps, embeddings)`` shaped by graph parts (``engine.extensions``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (attention processors already installed).
        parts: the extensions' modules, in graph order; each takes its inputs from ``extras``.
        image_tokens: T, the image tokens at the end of ``embeddings`` (default: the parts' sum;
            a runner that leaves a part out of a call still gives its count).

    ``forward(latents, timesteps, embeddings, *extras, flags=None)``:
        latents ``(B, C, h, w)``, timesteps ``(B,)`` int64, embeddings ``(B, L + T, D)``;
        ``extras``: each part's inputs in turn (``UNetShape.io`` order); ``flags``: host-side
        values for eager torch (``Conditioning.flags``).
    Returns the prediction ``(B, C, h, w)``, or a tuple of it and the parts' outputs in order.
    """

    def __init__(self, unet: Any, parts: Sequence[GraphPart] = (), image_tokens: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.parts = nn.ModuleList(parts)
        self._parts: list[GraphPart] = list(parts)  # the same modules, typed
        self.image_tokens = sum(p.image_tokens for p in parts) if image_tokens is None else image_tokens
        self.input_names = tuple(name for part in parts for name in part.inputs)
        self.output_names = tuple(name for part in parts for name in part.outputs)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        *extras: torch.Tensor,
        flags: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(extras) != len(self.input_names):
            raise ValueError(
                f"this UNet takes {list(self.input_names)} after its embeddings; given {len(extras)} tensors"
            )
        # 1. every part shapes the call from its inputs (added conditioning, residuals, attention)
        call = UNetCall(self.unet, latents, timesteps, embeddings, self.image_tokens, flags or {})
        start = 0
        for part in self._parts:
            count = len(part.inputs)
            part.before(call, extras[start : start + count])
            start += count
        # 2. the UNet itself; only what is there: the plain call stays the plain UNet call
        if call.attention:
            call.kwargs["cross_attention_kwargs"] = call.attention
        call.prediction = self.unet(
            latents, timesteps, encoder_hidden_states=embeddings, return_dict=False, **call.kwargs
        )[0]
        # 3. the parts' outputs (and changes to the prediction)
        outputs: list[torch.Tensor] = []
        for part in self._parts:
            outputs += part.after(call)
        assert call.prediction is not None
        return (call.prediction, *outputs) if outputs else call.prediction
