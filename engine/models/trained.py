"""``builtin:shapes``: the builtin model trained here on procedural drawings — configs, weights, checksum."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine.models.tiny import TEXT_CONFIG

SHAPES_MODEL_ID = "builtin:shapes"
SHAPES_WEIGHTS = Path(__file__).with_name("weights") / "shapes.safetensors"
SHAPES_SIZE = 128  # trained on 128x128 pictures (16x16 latents)
SHAPES_SHA256 = "372ebb15f47c31156132a87567d1b333f980748df515ee8f4027cf0d3b0fcf7a"
"""The shipped weights' checksum (scripts/train_builtin.py prints it at export)."""

# Latent (B, 4, 16, 16) at 128x128; cross-attention in every block on (B, 77, 64) text tokens.
SHAPES_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

# TAESD layout (8x, 4 latent channels): a light encoder and a wider decoder. The scaling
# factor brings the trained encoder's latents to unit variance (measured after training).
SHAPES_TAESD_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": (32, 32, 32, 32),
    "decoder_block_out_channels": (48, 48, 48, 48),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (2, 2, 2, 1),
    "latent_channels": 4,
    "scaling_factor": 1.0,
}

# The tiny model's text encoder, wider: the same local tokenizer (vocabulary, special ids, 77 tokens).
SHAPES_TEXT_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
}

# Prefixes of the parts in the one safetensors file.
PART_PREFIXES = ("unet.", "vae.", "text_encoder.")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
