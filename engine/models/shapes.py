"""Configs of real architectures for random-weight builtins: stabilityai/sd-turbo's exact shapes."""

from __future__ import annotations

from typing import Any

from engine.models.tiny import MAX_TOKENS

SD_TURBO_SHAPE_ID = "builtin:sd-turbo-shape"

# The SD 2.1-base UNet (865,910,724 parameters): latent (B, 4, 64, 64) at 512x512,
# cross-attention on (B, 77, 1024) OpenCLIP embeddings, linear projections in the transformers.
SD_TURBO_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": False,
}

# The OpenCLIP ViT-H/14 text tower as SD 2.x uses it (23 of its 24 layers; 340 M parameters
# with the real 49,408-token vocabulary). The builtin pairs it with the tiny local tokenizer,
# whose ids (< 1000) index the first rows of the same-size embedding table.
SD_TURBO_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}

# The SD AutoencoderKL (83,653,863 parameters): 8x scale factor, scaling factor 0.18215.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# TAESD (madebyollin/taesd) is ``AutoencoderTiny()`` with its default arguments (2.4 M parameters).
TAESD_REAL_CONFIG: dict[str, Any] = {}
