"""A feature cache of past frames (StreamV2V-style): self-attention also attends to cached features.

Each self-attention (``attn1``) layer ℓ of the UNet sees hidden states ``(B, T_ℓ, C_ℓ)``. The
bank keeps, per stream-batch row, the hidden states of the last F refreshes (every
``interval`` frames), flattened and concatenated over the layers: ``bank (F, B, N)`` with
``N = Σ T_ℓ·C_ℓ``. With the bank, layer ℓ computes

    K = to_k([h; bank_ℓ]),  V = to_v([h; bank_ℓ]),  out = softmax(q Kᵀ/√d + bias) V

where ``bias`` is 0 on the current tokens and ``log(strength)`` on a filled slot's tokens (a
large negative number on an empty slot: nothing). Optional feature injection first pulls each
current token toward its nearest cached token of the same layer and row when their cosine
similarity is above a threshold: ``h ← h + injection · [cos > threshold] · (h_nn − h)``.

Everything is explicit tensors (no state hidden in the modules): the bank, the per-slot bias
and the injection ``(strength, threshold)`` go in, the current hidden states ``(B, N)`` come out,
so an exported graph (ONNX Runtime, TensorRT) runs it as it is. Off means the plain processors:
the output is today's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.stream.attention import CrossFrameAttnProcessor

EMPTY_BIAS = -1.0e4  # exp(-1e4) is 0 in float16 and float32: an empty slot adds nothing
BANK_KWARGS = ("feature_bank", "feature_bias", "feature_injection", "captured")
"""The ``cross_attention_kwargs`` of a UNet with a feature bank; every processor accepts them."""


def _level(name: str, depth: int) -> int:
    """How many times the latent is halved where processor ``name`` runs (down/mid/up blocks)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return depth - 1 - int(parts[1])
    return depth - 1  # mid_block


@dataclass(frozen=True)
class FeatureLayout:
    """Where each ``attn1`` layer's hidden states lie in the flat ``(B, N)`` features.

    Attributes:
        names: the attn1 processor names, in layer-index order.
        sizes: ``T_ℓ·C_ℓ`` per layer.
        shapes: ``(T_ℓ, C_ℓ)`` per layer.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(tokens * channels for tokens, channels in self.shapes)

    @property
    def total(self) -> int:
        """N: every layer's values of one batch row."""
        return sum(self.sizes)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``(..., N)`` → per layer ``(..., T_ℓ, C_ℓ)`` views."""
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return [p.reshape(*p.shape[:-1], t, c) for p, (t, c) in zip(parts, self.shapes)]


def feature_layout(unet: Any, latent_height: int, latent_width: int) -> FeatureLayout:
    """The layout of ``unet``'s attn1 layers at a ``latent_height`` x ``latent_width`` latent.

    A block at level ``l`` runs at ``ceil(h / 2^l)`` x ``ceil(w / 2^l)`` tokens (stride-2 convs
    with padding 1), with the layer's query width as channels.
    """
    depth = len(unet.config.block_out_channels)
    names, shapes = [], []
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            continue
        height, width = latent_height, latent_width
        for _ in range(_level(name, depth)):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        attn = unet.get_submodule(name.removesuffix(".processor"))
        names.append(name)
        shapes.append((height * width, int(attn.to_q.in_features)))
    return FeatureLayout(tuple(names), tuple(shapes))


class FeatureBankAttnProcessor(CrossFrameAttnProcessor):
    """Self-attention over the current tokens (within cross-frame groups, if any) and layer
    ``index``'s cached tokens of the same batch row (see the module doc).

    A call without ``feature_bank`` (another pipeline on the same UNet with the cache off) goes
    to ``fallback``, the processor this one replaced, so it computes exactly what it did before;
    without a fallback it is ``CrossFrameAttnProcessor`` over ``groups``.
    """

    def __init__(
        self, index: int, groups: tuple[tuple[int, int], ...] | None = None, fallback: Any = None
    ) -> None:
        super().__init__(groups)
        self.index = index
        self.fallback = fallback

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_scale: torch.Tensor | None = None,
        feature_bank: Sequence[torch.Tensor] | None = None,
        feature_bias: torch.Tensor | None = None,
        feature_injection: torch.Tensor | None = None,
        captured: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        if feature_bank is None or encoder_hidden_states is not None or hidden_states.ndim != 3:
            if self.fallback is not None:
                return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None:
            raise ValueError("the feature bank serves plain transformer self-attention layers only")
        bank = feature_bank[self.index]  # (F, B, T, C)
        if tuple(bank.shape[1:]) != tuple(hidden_states.shape):
            raise ValueError(
                f"feature bank layer {self.index} holds {tuple(bank.shape[1:])}, the layer has "
                f"{tuple(hidden_states.shape)}: the bank was laid out for another size"
            )
        if captured is not None:
            captured[self.index] = hidden_states.reshape(hidden_states.shape[0], -1)
        if feature_injection is not None:
            hidden_states = _inject(hidden_states, bank, feature_injection)
        return self._attend(attn, hidden_states, bank, feature_bias)

    def _attend(
        self, attn: Any, hidden: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        residual = hidden
        batch, tokens, _ = hidden.shape
        frames = bank.shape[0]
        cached = bank.permute(1, 0, 2, 3).reshape(batch, frames * tokens, -1)  # (B, F·T, C)
        query = attn.to_q(hidden)
        head_dim = query.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        outputs = []
        # each row's keys: its group's current tokens (only its own without cross-frame
        # attention), then its own cached tokens
        for start, stop in self.groups or ((0, batch),):
            size = stop - start
            current = hidden[start:stop]
            if self.groups is not None:
                current = current.reshape(1, size * tokens, -1).expand(size, -1, -1)
            source = torch.cat([current, cached[start:stop]], dim=1)
            key, value = heads(attn.to_k(source)), heads(attn.to_v(source))
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            mask = _key_bias(bias, frames, current.shape[1], tokens, query)
            outputs.append(F.scaled_dot_product_attention(query[start:stop], key, value, attn_mask=mask))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _key_bias(
    bias: torch.Tensor | None, frames: int, current: int, tokens: int, like: torch.Tensor
) -> torch.Tensor:
    """The additive attention mask ``(1, 1, 1, current + F·T)``: 0 on the current tokens, then
    each slot's bias on its T cached tokens."""
    dtype, device = like.dtype, like.device
    slots = torch.zeros((frames,), dtype=dtype, device=device) if bias is None else bias.to(dtype)
    keys = torch.cat([torch.zeros((current,), dtype=dtype, device=device), slots.repeat_interleave(tokens)])
    return keys.view(1, 1, 1, -1)


def _inject(hidden: torch.Tensor, bank: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
    """Pull each token toward its most similar cached token of the same row (cosine above threshold)."""
    strength, threshold = injection[0].to(hidden.dtype), injection[1].to(hidden.dtype)
    batch, tokens, channels = hidden.shape
    cached = bank.permute(1, 0, 2, 3).reshape(batch, -1, channels)  # (B, F·T, C)
    similarity = F.normalize(hidden, dim=-1) @ F.normalize(cached, dim=-1).transpose(1, 2)
    best, index = similarity.max(dim=-1)  # (B, T)
    nearest = torch.gather(cached, 1, index.unsqueeze(-1).expand(batch, tokens, channels))
    weight = strength * (best > threshold).to(hidden.dtype)
    return hidden + weight.unsqueeze(-1) * (nearest - hidden)


def slot_bias(filled: Sequence[bool], strength: float) -> list[float]:
    """Per-slot attention bias: ``log(strength)`` where a slot holds features, else empty."""
    value = math.log(strength) if strength > 0 else EMPTY_BIAS
    return [max(value, EMPTY_BIAS) if full else EMPTY_BIAS for full in filled]


class FeatureCache:
    """The bank of one stream layout: F slots of each batch row's features ``(F, B, N)``.

    ``push`` stores a UNet call's features every ``interval`` calls, in place, into the next
    slot (the oldest is overwritten); ``bias`` and ``injection`` are the per-slot attention bias
    and the injection ``(strength, threshold)`` as tensors on the device, updated in place when
    a slot fills or a setting changes, never per frame. ``reset`` forgets every slot (a new
    prompt, seed or size: old features would pull the picture back).
    """

    def __init__(self, frames: int, batch: int, size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.bank = torch.zeros((frames, batch, size), device=device, dtype=dtype)
        self.bias = torch.full((frames,), EMPTY_BIAS, device=device, dtype=dtype)
        self.injection = torch.zeros((2,), device=device, dtype=dtype)
        self.filled = [False] * frames
        self.interval = 1
        self.strength = 1.0
        self.injecting = False  # host-side: injection strength above 0
        self._next = 0
        self._calls = 0
        self.pushes = 0

    @property
    def frames(self) -> int:
        return len(self.filled)

    def configure(self, interval: int, strength: float, injection: float, threshold: float) -> None:
        """The live settings (a commit, between two frames)."""
        self.interval, self.strength = int(interval), float(strength)
        self.injecting = float(injection) > 0.0
        self.injection.copy_(torch.tensor([float(injection), float(threshold)], dtype=self.injection.dtype))
        self._update_bias()

    def push(self, features: torch.Tensor) -> None:
        """One UNet call's features ``(B, N)``: kept when the interval comes round."""
        call, self._calls = self._calls, self._calls + 1
        if call % self.interval:
            return
        slot = self._next
        self.bank[slot].copy_(features)
        self._next = (slot + 1) % self.frames
        self.pushes += 1
        if not self.filled[slot]:
            self.filled[slot] = True
            self._update_bias()

    def reset(self) -> None:
        self.filled = [False] * self.frames
        self._next = self._calls = 0
        self._update_bias()

    def _update_bias(self) -> None:
        values = slot_bias(self.filled, self.strength)
        self.bias.copy_(torch.tensor(values, dtype=self.bias.dtype))
