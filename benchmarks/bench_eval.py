"""Evaluation throughput: generation images/s (the protocol's sampler, CFG) and reward scoring images/s.

  # CPU smoke run: the tiny random SD of the tests, a tiny random CLIP scorer and the shapes reward
  python benchmarks/bench_eval.py
  # GPU: SD1.5's architecture (random weights; speed does not depend on them) at 512 px, DDPM 50, CFG 7.5,
  # bf16 compute, scored by a random PickScore-sized CLIP (ViT-H/14)
  python benchmarks/bench_eval.py --sd15 --batch_size 8 --num_prompts 16

Numbers are steady state: each workload runs once to compile (the "compile_s" column includes that
first run), then is timed. Generation counts sampling + VAE decoding (not text encoding, done once
per prompt set); scoring counts host preprocessing + the jitted CLIP.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxpref import evaluate as ev  # noqa: E402
from jaxpref.models import clip, pipeline as pipeline_lib, vae as vae_lib  # noqa: E402
from jaxpref.models.presets import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD_VAE_CHANNELS  # noqa: E402
from jaxpref.rewards import pickscore_scorer, shapes_scorer  # noqa: E402
from jaxpref.rewards.clip_rewards import CLIPBackbone  # noqa: E402
from jaxpref.rewards.preprocess import Preprocess  # noqa: E402

SD15_VAE = {"block_out_channels": list(SD_VAE_CHANNELS), "layers_per_block": 2, "latent_channels": 4,
            "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
VIT_H_TEXT = clip.TextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=1024,
                             num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu")
VIT_H_VISION = clip.VisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                                 num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu")
TINY_TEXT = clip.TextConfig(vocab_size=58, hidden_size=32, intermediate_size=64, projection_dim=16,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
TINY_VISION = clip.VisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                                num_attention_heads=2, image_size=224, patch_size=32)


def _init(module, *args):
    return jax.jit(module.init)(jax.random.PRNGKey(0), *args)["params"]


def random_clip_scorer(text: clip.TextConfig, vision: clip.VisionConfig, tokenizer, dtype, batch_size: int):
    """A PickScore-formula scorer on a randomly initialised CLIP of the given size."""
    module = clip.CLIPModel(text, vision, projection_dim=vision.projection_dim, dtype=dtype)
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
    backbone = CLIPBackbone(module, _init(module, ids, pixels), tokenizer,
                            Preprocess(size=vision.image_size, crop=vision.image_size), "random CLIP")
    return pickscore_scorer(backbone, batch_size)


def tiny_setup(args):
    from tests.tiny_sd import build_tiny_sd, tiny_tokenizer

    folder = build_tiny_sd(tempfile.mkdtemp(prefix="bench_eval_"))
    pipe = pipeline_lib.load_pipeline(folder)
    tokenizer = tiny_tokenizer(tempfile.mkdtemp())
    from jaxpref.world import shapes

    prompts = (shapes.heldout_prompts("test") * 8)[:args.num_prompts]
    scorers = {"tiny_clip": random_clip_scorer(TINY_TEXT, TINY_VISION, tokenizer, jnp.float32, args.score_batch_size),
               "shapes": shapes_scorer()}
    return pipe, prompts, scorers


def sd15_setup(args):
    """SD1.5's architecture with random weights (nothing downloaded); bf16 compute, fp32 params."""
    from jaxpref.models import unet as unet_lib
    from tests.tiny_sd import tiny_tokenizer

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    tokenizer = tiny_tokenizer(tempfile.mkdtemp())
    tokenizer.model_max_length = 77  # SD's prompt length (ids index the full-size embedding tables)
    unet = unet_lib.unet_from_config(SD15_UNET, dtype=dtype)
    vae = vae_lib.vae_from_config(SD15_VAE, dtype=dtype)
    text = clip.CLIPTextModel(SD15_TEXT, dtype=dtype)
    pipe = pipeline_lib.SDPipeline(
        unet=unet, unet_params=_init(unet, *unet.dummy_inputs(side=8)[:3]),
        vae=vae, vae_params=_init(vae, jnp.zeros((1, 8, 8, 3))),
        text_encoder=text, text_encoder_params=_init(text, jnp.zeros((1, 77), jnp.int32)),
        tokenizer=tokenizer, scheduler_config=SD15_SCHEDULER, folder="random:sd15")
    prompts = [f"a photo of prompt {i}" for i in range(args.num_prompts)]
    return pipe, prompts, {"pickscore_vit_h": random_clip_scorer(VIT_H_TEXT, VIT_H_VISION, tokenizer, dtype,
                                                                  args.score_batch_size)}


def bench_generate(pipe, prompts, args) -> dict:
    kw = dict(num_images_per_prompt=args.images_per_prompt, sampler=args.sampler, num_steps=args.num_steps,
              guidance_scale=args.guidance_scale, batch_size=args.batch_size, height=args.resolution,
              width=args.resolution)
    t0 = time.perf_counter()
    ev.generate(pipe, prompts[:1], **{**kw, "num_images_per_prompt": 1})  # compile (same batch shape)
    compile_s = time.perf_counter() - t0
    gen = ev.generate(pipe, prompts, **kw)
    n = gen.images.shape[0] * gen.images.shape[1]
    return {"workload": f"generate {args.sampler}-{args.num_steps} cfg {args.guidance_scale}", "images": n,
            "image_px": gen.images.shape[2], "batch": args.batch_size, "compile_s": round(compile_s, 2),
            "seconds": round(gen.seconds, 3), "images_per_s": round(gen.images_per_second, 3), "_images": gen.images}


def bench_score(name, scorer, images, prompts) -> dict:
    flat = images.reshape(-1, *images.shape[2:])
    texts = [p for p in prompts for _ in range(images.shape[1])]
    t0 = time.perf_counter()
    scorer(flat[:scorer.batch_size], texts[:scorer.batch_size])  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = scorer(flat, texts)
    seconds = time.perf_counter() - t0
    return {"workload": f"score {name}", "images": len(flat), "image_px": flat.shape[1], "batch": scorer.batch_size,
            "compile_s": round(compile_s, 2), "seconds": round(seconds, 3),
            "images_per_s": round(len(flat) / seconds, 1), "mean_score": round(float(scores.mean()), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="SD1.5 architecture at 512 px (GPU)")
    p.add_argument("--num_prompts", type=int, default=None, help="default: 16 tiny, 16 sd15")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm++"])
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--score_batch_size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="sd15 compute dtype")
    args = p.parse_args()
    args.num_prompts = args.num_prompts or 16
    pipe, prompts, scorers = (sd15_setup if args.sd15 else tiny_setup)(args)
    rows = [bench_generate(pipe, prompts, args)]
    images = rows[0].pop("_images")
    rows += [bench_score(name, s, images, prompts) for name, s in scorers.items()]
    print(json.dumps({"devices": [str(d) for d in jax.devices()], "model": "sd15 (random)" if args.sd15 else "tiny",
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
