"""Tiny random PyTorch models and a tiny diffusers SD pipeline folder, built offline for tests.

Every param is perturbed with seeded noise (``randomize_``) so zero- or identity-initialized weights
(zero-init convs, LayerNorm scale 1) cannot hide a conversion bug.
"""
from __future__ import annotations

import json
import os
import string
import tempfile

import torch

TINY_VAE = dict(block_out_channels=(8, 16, 16), down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=16)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                 attention_head_dim=2, norm_num_groups=4)
MAX_LENGTH = 12


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Adds N(0, scale^2) noise to every param in place (fixed seed); returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


def tiny_vocab() -> list[str]:
    """CLIP-BPE style vocab: specials, letters, end-of-word letters, and two merged words."""
    letters = list(string.ascii_lowercase)
    return ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + [
        "th", "the</w>", "ca", "cat</w>"]


def tiny_tokenizer(folder: str):
    """A transformers CLIPTokenizer from hand-written vocab.json + merges.txt (no hub)."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tiny_vocab())}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=MAX_LENGTH)


def tiny_text_config(**overrides):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=len(tiny_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=8, bos_token_id=0,
              eos_token_id=1, pad_token_id=1)
    return CLIPTextConfig(**{**kw, **overrides})


def tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**{**TINY_VAE, **overrides}), seed)


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, **overrides):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize_(cls(tiny_text_config(**overrides)), seed)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**TINY_UNET), seed)


def build_tiny_sd(folder: str, seed: int = 0) -> str:
    """Writes a random tiny diffusers StableDiffusionPipeline folder (safetensors) and returns it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(src)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed + 1),
                                   tokenizer=tokenizer, unet=tiny_unet(seed + 2), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
