"""Named model and scheduler configs, one home for each: the public checkpoints' (SD1.5, SD2.1, SDXL), the
shipped tiny model's (jaxpref/assets/tiny_sd), and the small random ones the benchmark and the tests build.

They used to be written out where they were used (the UNet module, the tiny model's trainer, the benchmark,
test helpers), and copies of one config drift apart; everything that names a config imports it from here.

A dict is what lands in the component's config.json (diffusers / transformers keys): it goes to
``unet_from_config`` / ``vae_from_config`` / ``clip.text_encoder_from_config`` / ``NoiseSchedule.from_config``,
or as keyword arguments to the PyTorch classes (``TEST_*``). Text towers that only ever exist in memory (the
benchmark's) are ``clip.TextConfig``. Treat every preset as a constant: vary a copy, ``{**PRESET, key: value}``.
"""
from __future__ import annotations

from jaxpref.models import clip

# ---------------------------------------------------------------------------------------------
# Schedulers.

# SD1.5's scheduler, verbatim (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json) plus an
# explicit prediction_type.
SD15_SCHEDULER = {
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


# ---------------------------------------------------------------------------------------------
# The public checkpoints (their ``unet/config.json``; the text encoder as ``clip.TextConfig``).

SD15_UNET = {  # runwayml/stable-diffusion-v1-5: 859,520,964 params
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_UNET = {  # stabilityai/stable-diffusion-2-1 (768-v): 865,910,724 params
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}

SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0: 2,567,463,684 params
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# SD1.5's UNet at a fifth of the width in every block (same depth, attention layout, 768-d text).
SD15_NARROW_UNET = {**SD15_UNET, "block_out_channels": [64, 128, 256, 256]}

# SD1.5's text encoder: CLIP ViT-L/14's text tower.
SD15_TEXT = clip.TextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77)

# SD's VAE (also SDXL's, and its fp16-fix version): block widths of the AutoencoderKL, 8x downsampling.
SD_VAE_CHANNELS = (128, 256, 512, 512)

# SDXL's two text encoders: CLIP ViT-L/14's text tower (as SD1.5's) and OpenCLIP ViT-bigG/14's, with the
# pooled projection (694,659,840 params); the conditioning is both penultimate states, 768 + 1280 = 2048.
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = clip.TextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")


# ---------------------------------------------------------------------------------------------
# The shipped tiny model (jaxpref/assets/tiny_sd; trained by ``python -m jaxpref.world.train_base``): SD1.5-shaped,
# sized for the 32x32 shapes world, with SD15_SCHEDULER. The VAE's ``scaling_factor`` is left None here:
# ``train_base`` measures it on the trained latents (1 / std, as SD's 0.18215) and records it in vae/config.json.

# VAE: 32x32 RGB -> 8x8x4 latents (two downsamples, f = 4). Small first stage: the 32x32 convs are where
# the CPU time goes.
TINY_SD_VAE = {
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
TINY_SD_TEXT_ENCODER = {
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
TINY_SD_UNET = {
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


# ---------------------------------------------------------------------------------------------
# The benchmark's tiny random model (``python benchmarks/bench.py``'s CPU smoke size).

BENCH_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                       down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                       attention_head_dim=4, norm_num_groups=8)
BENCH_TINY_TEXT = clip.TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8,
                                  bos_token_id=998, eos_token_id=999, pad_token_id=999)


# ---------------------------------------------------------------------------------------------
# The tests' tiny random PyTorch pipeline (tests/tiny_sd.py builds it): keyword arguments of diffusers'
# AutoencoderKL / UNet2DConditionModel and transformers' CLIPTextConfig. The text encoder's vocabulary is
# tests/tiny_sd.py's tiny_vocab() (58 tokens, <|startoftext|> = 0, <|endoftext|> = 1) and its positions
# the tiny tokenizer's model_max_length.

TEST_TINY_VAE = dict(block_out_channels=(8, 16, 16), down_block_types=["DownEncoderBlock2D"] * 3,
                     up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4,
                     norm_num_groups=4, sample_size=16)
TEST_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                      attention_head_dim=2, norm_num_groups=4)
TEST_TINY_TEXT_ENCODER = dict(vocab_size=58, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=12, projection_dim=8, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1)
# The tests' tiny random SDXL pipeline (tests/tiny_sd.py ``build_tiny_sdxl``): the same tiny vocabulary for
# both encoders (the second one wider and with a projection, as SDXL's OpenCLIP-bigG), context 16 + 24 = 40,
# text_time embeddings of the projected pooled text (8) and 6 time ids (4 channels each).
TEST_TINY_TEXT_ENCODER_2 = dict(TEST_TINY_TEXT_ENCODER, hidden_size=24, intermediate_size=48)
TEST_TINY_SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16 + 24,
                           attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
                           norm_num_groups=4)
