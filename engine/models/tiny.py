"""Configs of the builtin tiny random-weight SD-style and SDXL-style models and their local tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from engine.models.scheduler import (
    DEFAULT_ORIGINAL_INFERENCE_STEPS,
    SD_BETA_END,
    SD_BETA_SCHEDULE,
    SD_BETA_START,
    SD_NUM_TRAIN_TIMESTEPS,
)

TINY_MODEL_ID = "builtin:tiny"
TINY_TOKENIZER_DIR = Path(__file__).with_name("tiny_tokenizer")
MAX_TOKENS = 77

# Latent (B, 4, 32, 32) at a 256x256 image; cross-attention on (B, 77, 32) text embeddings.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# TAESD layout with 16 channels instead of 64: 4 blocks, 3 stride-2 stages, 8x scale factor.
TAESD_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": (16, 16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16, 16),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
    "scaling_factor": 1.0,
}

# SD VAE layout: 4 down blocks (3 downsamples, 8x scale factor), scaling factor 0.18215.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}


# builtin:tiny-sdxl: SDXL's layout shrunk (diffusers' SDXL test UNet): cross-attention on the two
# encoders' concatenated (B, 77, 32 + 32) tokens, "text_time" added embeddings of the second
# encoder's pooled (B, 32) and the 6 time ids (8 each): 32 + 6 * 8 = 80.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}

# The second text encoder (CLIPTextModelWithProjection): its pooled projection is text_embeds.
SDXL_TEXT_2_CONFIG: dict[str, Any] = {**TEXT_CONFIG, "hidden_act": "gelu"}


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer shipped in ``tiny_tokenizer/`` (byte-level BPE, ids < 1000, 77 tokens)."""
    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), model_max_length=MAX_TOKENS)


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """An ``LCMScheduler`` config with the SD 1.x/2.x beta schedule and ``prediction_type``."""
    return {
        "_class_name": "LCMScheduler",
        "num_train_timesteps": SD_NUM_TRAIN_TIMESTEPS,
        "beta_start": SD_BETA_START,
        "beta_end": SD_BETA_END,
        "beta_schedule": SD_BETA_SCHEDULE,
        "original_inference_steps": DEFAULT_ORIGINAL_INFERENCE_STEPS,
        "prediction_type": prediction_type,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "timestep_scaling": 10.0,
        "clip_sample": False,
    }
