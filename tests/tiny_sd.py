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

from jaxpref.models.presets import (SD15_SCHEDULER, TEST_TINY_SDXL_UNET, TEST_TINY_TEXT_ENCODER, TEST_TINY_TEXT_ENCODER_2,
                                     TEST_TINY_UNET, TEST_TINY_VAE)

MAX_LENGTH = TEST_TINY_TEXT_ENCODER["max_position_embeddings"]  # the tiny tokenizer's model_max_length


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


assert len(tiny_vocab()) == TEST_TINY_TEXT_ENCODER["vocab_size"]


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

    return CLIPTextConfig(**{**TEST_TINY_TEXT_ENCODER, **overrides})


def tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**{**TEST_TINY_VAE, **overrides}), seed)


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, **overrides):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize_(cls(tiny_text_config(**overrides)), seed)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**TEST_TINY_UNET), seed)


def build_tiny_sd(folder: str, seed: int = 0) -> str:
    """Writes a random tiny diffusers StableDiffusionPipeline folder (safetensors) and returns it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(src)
    # SD1.5's schedule as a DDIM scheduler (PNDM's skip_prk_steps would be written to its config).
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"})
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed + 1),
                                   tokenizer=tokenizer, unet=tiny_unet(seed + 2), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**TEST_TINY_SDXL_UNET), seed)


def build_tiny_sdxl(folder: str, seed: int = 0) -> str:
    """Writes a random tiny diffusers StableDiffusionXLPipeline folder and returns it: as SDXL base, an Euler
    scheduler with "leading" spacing, a second tokenizer that differs only in its padding token, VAE
    scaling_factor 0.13025."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(src)
        tokenizer_2 = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                                    model_max_length=MAX_LENGTH, pad_token="a</w>")
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"}, timestep_spacing="leading",
        interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed, scaling_factor=0.13025), text_encoder=tiny_text_encoder(seed + 1), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(seed + 3, with_projection=True, **TEST_TINY_TEXT_ENCODER_2),
        tokenizer_2=tokenizer_2, unet=tiny_sdxl_unet(seed + 2), scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
