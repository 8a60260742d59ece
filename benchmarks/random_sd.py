"""The benchmark's models and inputs: the sizes, a random-weight SD pipeline, the run config of one
benchmark, and a random cached-latent batch. Weights are random: a step's time does not depend on them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import config_lib
from jaxpref.methods import get_method
from jaxpref.flops import SD15_FWD_FLOPS, SD15_FWDBWD_FLOPS
from jaxpref.models import clip, pipeline as pipeline_lib, unet as unet_lib, vae as vae_lib
from jaxpref.models.presets import (BENCH_TINY_TEXT as TINY_TEXT, BENCH_TINY_UNET as TINY_UNET_CONFIG,
                                    SD15_NARROW_UNET as SD15_NARROW_UNET_CONFIG, SD15_SCHEDULER, SD15_TEXT,
                                    SD15_UNET, SD_VAE_CHANNELS)


@dataclasses.dataclass(frozen=True)
class Size:
    unet: dict                     # diffusers unet/config.json
    latent: int                    # latent side (h = w)
    text: clip.TextConfig          # the caption encoder (SD1.5: CLIP ViT-L/14's text tower)
    vae_channels: tuple            # VAE block_out_channels: only their count matters (latent_shape)
    batch: int                     # default pairs per step
    fwd_flops: Optional[float]     # F per image (None: from XLA)
    fwdbwd_flops: Optional[float]  # G per image


SIZES = {
    "tiny": Size(TINY_UNET_CONFIG, 8, TINY_TEXT, (8, 16), 2, None, None),
    "tiny16": Size(TINY_UNET_CONFIG, 16, TINY_TEXT, (8, 16), 2, None, None),
    "sd15": Size(SD15_UNET, 64, SD15_TEXT, SD_VAE_CHANNELS, 8, SD15_FWD_FLOPS, SD15_FWDBWD_FLOPS),
    "sd15-narrow": Size(SD15_NARROW_UNET_CONFIG, 64, SD15_TEXT, SD_VAE_CHANNELS, 8, None, None),
}


def random_params(shapes, seed: int = 0, on_host: bool = False):
    """Params for a ShapeDtypeStruct tree, drawn on the host: kernels N(0, 1/fan_in), norm scales ~1,
    the rest N(0, 0.02²). Keeps activations O(1) through a deep random UNet so the losses stay finite.
    (numpy, not a jitted init: one random op per leaf makes an XLA program that compiles for minutes.)
    ``on_host``: numpy leaves, nothing put on a device yet."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        n = rng.standard_normal(s.shape, dtype=np.float32)
        if name == "kernel" and len(s.shape) >= 2:
            n *= np.float32(1.0 / math.sqrt(int(np.prod(s.shape[:-1]))))
        elif name == "scale":
            n = 1.0 + np.float32(0.02) * n
        else:
            n *= np.float32(0.02)
        return np.asarray(n, s.dtype) if on_host else jnp.asarray(n, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_pipeline(size: Size, dtype, attention_impl: Optional[str] = None, seed: int = 0,
                    with_params: bool = True, on_host: bool = False) -> pipeline_lib.SDPipeline:
    """An ``SDPipeline`` of random fp32 weights: the UNet of ``size`` (compute ``dtype``), a CLIP text
    encoder of ``size.text``, a VAE module without params (only its config is read), a stub tokenizer.
    ``with_params=False`` leaves ShapeDtypeStructs in place of params (nothing is allocated); ``on_host``
    keeps the params in host memory (numpy)."""
    unet = unet_lib.unet_from_config(size.unet, source="benchmarks/bench.py size", dtype=dtype,
                                     attention_impl=attention_impl)
    text_encoder = clip.CLIPTextModel(config=size.text, dtype=dtype)
    vae = vae_lib.AutoencoderKL(block_out_channels=tuple(size.vae_channels))
    shapes = pipeline_lib.shape_pipeline(unet, text_encoder, vae, SD15_SCHEDULER, "random-weights")
    if not with_params:
        return shapes
    return dataclasses.replace(shapes, unet_params=random_params(shapes.unet_params, seed, on_host),
                               text_encoder_params=random_params(shapes.text_encoder_params, seed + 1, on_host))


def bench_config(size: Size, objective: str, batch: int, dtype: str, remat: bool, overrides=(),
                 attention: str = "xla"):
    """The run config of a benchmark: the base config with the objective's defaults, one micro-batch,
    the attention backend named (not "auto": a table row says which kernel it timed).

    overrides: "key.path=value" strings (``--set dro.steps_per_trajectory=4``), values read as Python
    literals where they parse, else as strings.
    """
    c = config_lib.base_config()
    c.objective = objective
    c.dtype = dtype
    c.reference_dtype = "bfloat16"
    c.remat = remat
    c.attention = attention
    c.batch_size, c.grad_accum = batch, 1
    c.data.resolution = size.latent * 2 ** (len(size.vae_channels) - 1)
    config_lib.apply_overrides(c, config_lib.parse_overrides(overrides))
    get_method(c.objective).fit_config_to_batch(c, batch)
    return config_lib.validate(c)


def make_batch(run, batch: int, seed: int = 0) -> dict:
    """Random cached-latent batch in ``step``'s layout (numpy): pairs [B, 2, h, w, c], or experts
    [B, h, w, c] for a method fed experts; reward scores for a method that needs them."""
    rng = np.random.default_rng(seed)
    h, w, ch = run.latent_shape
    shape = (batch, h, w, ch) if run.method.data == "experts" else (batch, 2, h, w, ch)
    vocab = run.pipeline.text_encoder.config.vocab_size
    ids = rng.integers(0, vocab - 2, (batch, run.text_shape[0])).astype(np.int32)
    ids[:, 0], ids[:, -1] = run.pipeline.tokenizer.bos, run.pipeline.tokenizer.eos
    out = {"input_ids": ids,
           "latent_mean": rng.standard_normal(shape).astype(np.float32) * 4.0,
           "latent_std": np.full(shape, 0.1, np.float32)}
    if run.method.needs_rewards:
        out["rewards"] = rng.uniform(0.12, 0.28, (batch, 2)).astype(np.float32)
    return out
