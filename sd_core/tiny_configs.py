"""Configs of tiny random Stable Diffusion models, in diffusers' config.json form.

Tests and `make demo` build models from these: the same architectures as SD1.x / SD2.x / SDXL base and
refiner (same block types, key layout and options), shrunk so a CPU runs them in milliseconds.
"""

TINY_V1 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "use_linear_projection": False,
        "upcast_attention": False,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    },
    "scheduler": {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    },
    "tokenizer": {"pad_token": "<|endoftext|>"},
}

# SD2.x-style: linear transformer projections, per-block head counts, upcast attention,
# a wider cross-attention, GELU text encoder, v-prediction and "!" as the padding token.
TINY_V2 = {
    "unet": {
        **TINY_V1["unet"],
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae": dict(TINY_V1["vae"]),
    "text_encoder": {
        **TINY_V1["text_encoder"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "hidden_act": "gelu",
        "projection_dim": 64,
    },
    "scheduler": {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    },
    "tokenizer": {"pad_token": "!"},
}

_XL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
_XL_TEXT = {**TINY_V1["text_encoder"], "num_hidden_layers": 4}
_XL_TEXT_2 = {  # OpenCLIP bigG's kind: GELU, with a text projection
    **_XL_TEXT,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
_XL_UNET = {
    **TINY_V1["unet"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
}
_XL_VAE = {**TINY_V1["vae"], "scaling_factor": 0.13025, "force_upcast": True}

# SDXL base-style: no attention at the first level, deeper transformers further down, both text towers
# (32 + 64 = 96-wide context), pooled projection 32 + 6 micro-conditioning values x 8.
TINY_XL_BASE = {
    "unet": {
        **_XL_UNET,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": 96,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
    },
    "vae": _XL_VAE,
    "text_encoder": _XL_TEXT,
    "text_encoder_2": _XL_TEXT_2,
    "scheduler": _XL_SCHEDULER,
    "tokenizer": {"pad_token": "<|endoftext|>"},
    "tokenizer_2": {"pad_token": "!"},
    "pipeline": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
}
# SDXL refiner-style: four levels, the second tower only (64-wide context), pooled 32 + 5 values x 8.
TINY_XL_REFINER = {
    "unet": {
        **_XL_UNET,
        "block_out_channels": [32, 64, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 2,
        "attention_head_dim": [2, 4, 4, 4],
        "cross_attention_dim": 64,
        "projection_class_embeddings_input_dim": 32 + 5 * 8,
    },
    "vae": _XL_VAE,
    "text_encoder_2": _XL_TEXT_2,
    "scheduler": _XL_SCHEDULER,
    "tokenizer_2": {"pad_token": "!"},
    "pipeline": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
}

TINY_CONFIGS = {"v1": TINY_V1, "v2": TINY_V2, "xl_base": TINY_XL_BASE, "xl_refiner": TINY_XL_REFINER}
