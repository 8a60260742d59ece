"""Configs of the shipped tiny base model (jaxpref/assets/tiny_sd): SD1.5-shaped, sized for 32x32 shapes.

Each dict is what lands in the component's config.json (diffusers / transformers keys), so the folder
loads with ``jaxpref.models.load_pipeline`` and ``diffusers.StableDiffusionPipeline.from_pretrained``.
The VAE's ``scaling_factor`` is left None here: ``train_base`` measures it on the trained latents
(1 / std, as SD's 0.18215) and records it in vae/config.json.
"""
from __future__ import annotations

# VAE: 32x32 RGB -> 8x8x4 latents (two downsamples, f = 4). Small first stage: the 32x32 convs are where
# the CPU time goes.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "mid_block_add_attention": True,
    "scaling_factor": None,  # measured by train_base
}

# CLIP text encoder over the shapes tokenizer (jaxpref/assets/shapes_tokenizer): 576 tokens,
# <|startoftext|> = 574, <|endoftext|> = 575 (also the pad token, as in SD's tokenizer). With
# eos_token_id = 575 transformers pools at the first <|endoftext|>, which is the caption's end.
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 576,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 574,
    "eos_token_id": 575,
    "pad_token_id": 575,
}

# UNet on 8x8x4 latents: three resolutions (8x8, 4x4, 2x2) with channels growing as they shrink (most
# params where positions are few: 1.08M params, 55 MFLOP forward per sample), cross-attention everywhere,
# conditioned on the text encoder's last hidden state (cross_attention_dim = its hidden size).
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 1,
    "attention_head_dim": 2,  # diffusers' legacy name: the NUMBER of heads per block (head dims 8, 16, 32)
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}

# SD1.5's scheduler, verbatim (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json) plus an
# explicit prediction_type.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
