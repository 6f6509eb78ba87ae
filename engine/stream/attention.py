"""Cross-frame self-attention: each stream-batch element attends to all elements' keys/values."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class CrossFrameAttnProcessor:
    """Attention processor (diffusers processor protocol) for self-attention layers.

    ``Attn(Q_i, K_batch, V_batch)``: queries of batch element i attend to the keys and values
    of every element in its group, concatenated along the token axis. Groups are static
    ``(start, stop)`` ranges set by the pipeline when the batch layout changes (for full CFG
    the unconditional and conditional halves are separate groups), so the traced graph has no
    data-dependent control flow. With one element per group this is plain attention.
    Cross-attention calls (``encoder_hidden_states`` given) are computed plainly.
    """

    def __init__(self, groups: tuple[tuple[int, int], ...] | None = None) -> None:
        self.groups = groups

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_scale: torch.Tensor | None = None,  # for the IP-Adapter's attn2 layers; not used here
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_self = encoder_hidden_states is None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if not is_self and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_self and attention_mask is None:
            out = self._grouped(query, key, value, batch)
        else:
            if attention_mask is not None:
                mask_len = key.shape[2]
                attention_mask = attn.prepare_attention_mask(attention_mask, mask_len, batch)
                attention_mask = attention_mask.view(
                    batch, attn.heads, -1, attention_mask.shape[-1]
                )
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _grouped(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Queries ``(B, h, L, d)`` attend to their group's keys/values ``(1, h, G·L, d)``."""
        groups = self.groups or ((0, batch),)
        outputs = []
        for start, stop in groups:
            size = stop - start
            k = _merge_tokens(key[start:stop])
            v = _merge_tokens(value[start:stop])
            outputs.append(
                F.scaled_dot_product_attention(
                    query[start:stop], k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def _merge_tokens(t: torch.Tensor) -> torch.Tensor:
    """``(G, h, L, d)`` → ``(1, h, G·L, d)``: every element's tokens side by side."""
    g, h, length, d = t.shape
    return t.permute(1, 0, 2, 3).reshape(1, h, g * length, d)


def batch_groups(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Consecutive ``(start, stop)`` ranges for group sizes, e.g. (1, 4) → ((0, 1), (1, 5))."""
    ranges = []
    start = 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return tuple(ranges)
