"""IP-Adapter cross-attention: text tokens as usual plus image tokens scaled by a tensor (export-friendly)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn


class IpAttnProcessor(nn.Module):
    """diffusers attention processor for the cross-attention (``attn2``) layers with an IP-Adapter.

    ``encoder_hidden_states`` is ``(B, L + T, D)``: L text tokens, then T = ``num_tokens`` image
    tokens. The text part is computed with exactly the operations of diffusers'
    ``AttnProcessor2_0`` on ``(B, L, D)``; the image part, ``attention(q, to_k_ip(ip),
    to_v_ip(ip))``, is added times ``ip_scale`` before ``to_out`` (as ``IPAdapterAttnProcessor2_0``
    does). ``ip_scale`` is a tensor ``(1,)`` or ``(B,)`` passed through
    ``cross_attention_kwargs``, so an exported graph takes it as an input; ``None`` leaves the
    image out and the result equals ``AttnProcessor2_0``'s bit for bit (a zero scale equals it
    up to ``x + 0``, which is exact too).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = int(num_tokens)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_scale: torch.Tensor | None = None,
        feature_bank: Any = None,
        feature_bias: Any = None,
        feature_injection: Any = None,
        captured: Any = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("IpAttnProcessor serves cross-attention (attn2) layers only")
        text = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - self.num_tokens]
        image = encoder_hidden_states[:, encoder_hidden_states.shape[1] - self.num_tokens :]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = text.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key = attn.to_k(text)
        value = attn.to_v(text)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if ip_scale is not None:
            ip_key = self.to_k_ip(image).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = self.to_v_ip(image).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_states = F.scaled_dot_product_attention(
                query, ip_key, ip_value, dropout_p=0.0, is_causal=False
            )
            ip_states = ip_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            scale = ip_scale.to(query.dtype).reshape(-1, 1, 1)
            hidden_states = hidden_states + scale * ip_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class PlainAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` that also takes (and ignores) ``ip_scale`` and the feature cache's
    arguments: every layer of a UNet receives the same ``cross_attention_kwargs``, and diffusers
    warns on each call of a processor that does not name them."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        *args: Any,
        ip_scale: Any = None,
        feature_bank: Any = None,
        feature_bias: Any = None,
        feature_injection: Any = None,
        captured: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, *args, **kwargs)
