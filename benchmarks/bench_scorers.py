"""Reward scoring throughput: images/s of each scorer behind ``jaxpref.rewards.Scorer``, random weights.

  # CPU, tiny towers (seconds): every scorer's formula on tiny random CLIPs / a tiny random BLIP
  python benchmarks/bench_scorers.py --out benchmarks/results/scorers_cpu_tiny.json
  # The published architectures (random weights; speed does not depend on them): CLIP ViT-H/14
  # (PickScore, HPSv2), ViT-L/14 (CLIP score, aesthetic), ImageReward's ViT-L/16 + BERT-base
  python benchmarks/bench_scorers.py --full --num_images 64 --out benchmarks/results/scorers_<device>.json

A row's time is the Scorer call on ``num_images`` 512 px uint8 images (the shapes reward: its own
32 px world renders): host preprocessing (Pillow bicubic resize to the tower's side, normalization,
tokenization) plus the jitted model, after one batch that compiles it ("compile_s" includes that
batch). On CPU at tiny sizes the host preprocessing dominates; the machine's load average is recorded.
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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_eval import TINY_TEXT, TINY_VISION, VIT_H_TEXT, VIT_H_VISION  # noqa: E402
from jaxpref.models import blip, clip  # noqa: E402
from jaxpref.rewards import (aesthetic_scorer, clipscore_scorer, hpsv2_scorer, imagereward,  # noqa: E402
                             pickscore_scorer, shapes_scorer)
from jaxpref.rewards.clip_rewards import CLIPBackbone  # noqa: E402
from jaxpref.rewards.preprocess import Preprocess  # noqa: E402

VIT_L_TEXT = clip.TextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                             num_attention_heads=12)
VIT_L_VISION = clip.VisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=224, patch_size=14)
TINY_BLIP_VISION = blip.VisionConfig(image_size=224, patch_size=16, width=64, depth=2, num_heads=1)
TINY_BLIP_TEXT = blip.TextConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=40)
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "prompt", "0", "1", "2", "3", "4",
              "5", "6", "7", "8", "9"]


def _init(module, *args):
    return jax.jit(module.init)(jax.random.PRNGKey(0), *args)["params"]


def clip_backbone(text: clip.TextConfig, vision: clip.VisionConfig, tokenizer, dtype) -> CLIPBackbone:
    module = clip.CLIPModel(text, vision, projection_dim=vision.projection_dim, dtype=dtype)
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
    return CLIPBackbone(module, _init(module, ids, pixels), tokenizer,
                        Preprocess(size=vision.image_size, crop=vision.image_size), "random CLIP")


def bert_tokenizer(folder: str):
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(BERT_VOCAB) + "\n")
    return imagereward.load_bert_tokenizer(folder)


def imagereward_backbone(vision: blip.VisionConfig, text: blip.TextConfig, tokenizer, dtype):
    module = imagereward.ImageRewardModel(vision, text, dtype=dtype)
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, imagereward.MAX_TEXT_LENGTH), jnp.int32)
    return imagereward.ImageRewardBackbone(module, _init(module, pixels, ids, ids), tokenizer,
                                           imagereward.imagereward_preprocess(vision.image_size), "random BLIP")


def scorers(args) -> dict:
    from tests.tiny_sd import tiny_tokenizer

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    clip_tok = tiny_tokenizer(tempfile.mkdtemp())
    bert_tok = bert_tokenizer(tempfile.mkdtemp())
    b = args.batch_size
    if args.full:
        clip_tok.model_max_length = 77
        vit_h = clip_backbone(VIT_H_TEXT, VIT_H_VISION, clip_tok, dtype)
        vit_l = clip_backbone(VIT_L_TEXT, VIT_L_VISION, clip_tok, dtype)
        ir = imagereward_backbone(blip.VisionConfig(), blip.TextConfig(), bert_tok, dtype)
    else:
        vit_h = vit_l = clip_backbone(TINY_TEXT, TINY_VISION, clip_tok, dtype)
        ir = imagereward_backbone(TINY_BLIP_VISION, TINY_BLIP_TEXT, bert_tok, dtype)
    head = np.random.default_rng(0).standard_normal(vit_l.module.projection_dim).astype(np.float32) * 0.01
    return {"pickscore": pickscore_scorer(vit_h, b), "hpsv2": hpsv2_scorer(vit_h, b),
            "clipscore": clipscore_scorer(vit_l, b), "aesthetic": aesthetic_scorer(vit_l, head, 5.0, b),
            "imagereward": imagereward.imagereward_scorer(ir, b), "shapes": shapes_scorer()}


def bench(name: str, scorer, images: np.ndarray, prompts: list) -> dict:
    t0 = time.perf_counter()
    scorer(images[:scorer.batch_size], prompts[:scorer.batch_size])  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = scorer(images, prompts)
    seconds = time.perf_counter() - t0
    return {"scorer": name, "images": len(images), "image_px": images.shape[1], "batch": scorer.batch_size,
            "compile_s": round(compile_s, 2), "seconds": round(seconds, 3),
            "images_per_s": round(len(images) / seconds, 1), "finite": bool(np.isfinite(scores).all())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the published architectures (GPU/TPU)")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--image_px", type=int, default=512, help="side of the generated images that are scored")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    from jaxpref.world import shapes

    prompts = (shapes.heldout_prompts("test") * args.num_images)[:args.num_images]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_images, args.image_px, args.image_px, 3), np.uint8)
    world = np.stack([shapes.render(c, rng) for c in prompts])  # the shapes reward reads its own 32 px world
    rows = [bench(name, s, world if name == "shapes" else images, prompts) for name, s in scorers(args).items()]
    device = jax.devices()[0]
    report = {"device": f"{device.platform}: {device.device_kind}", "num_devices": jax.device_count(),
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 1),
              "sizes": "full (random weights)" if args.full else "tiny (random weights)",
              "dtype": args.dtype, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
