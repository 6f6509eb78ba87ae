"""Configs of real architectures for random-weight builtins: sd-turbo's and sdxl-turbo's exact shapes."""

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

SDXL_TURBO_SHAPE_ID = "builtin:sdxl-turbo-shape"

# The SDXL UNet as stabilityai/sdxl-turbo ships it (2,567,463,684 parameters): latent (B, 4, 64, 64)
# at 512x512, cross-attention on (B, 77, 768 + 1280) tokens, "text_time" added embeddings of the
# pooled (B, 1280) and the 6 time ids (256 each): 1280 + 6 * 256 = 2816.
SDXL_TURBO_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# CLIP ViT-L/14's text tower (SDXL's first encoder; its penultimate layer is used).
SDXL_TEXT_CONFIG: dict[str, Any] = {
    **SD_TURBO_TEXT_CONFIG,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder; pooled 1280).
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    **SD_TURBO_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# The SDXL AutoencoderKL: the SD layout with scaling factor 0.13025.
SDXL_VAE_CONFIG: dict[str, Any] = {**SD_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}
