"""Reward models behind one interface (docs/methods.md §5): ``load_scorer(name, path)(images, prompts) -> [B]``.

Names and what ``path`` must hold (local folders only; nothing is downloaded):

- "pickscore": an HF CLIPModel folder (yuvalkirstain/PickScore_v1) with CLIP tokenizer files and,
  ideally, laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json. exp(logit_scale)·cos.
- "clipscore": an HF CLIPModel folder (openai/clip-vit-large-patch14). 100·max(cos, 0) (torchmetrics).
- "hpsv2": HPS_v2[.1]_compressed.pt (or a .safetensors/.npz copy) + CLIP tokenizer files. 100·cos.
- "aesthetic": an HF CLIPModel of ViT-L/14 (the folder or its clip/ subfolder) + the LAION linear
  head sa_0_4_vit_l_14_linear.pth (or .safetensors/.npz).
- "imagereward": not available (see ``imagereward_scorer``).
- "shapes": the shapes world's analytic reward; no path.

The data engineer's score builder and DRO's expert selection call a scorer as
``score_fn(images uint8 [B, H, W, 3], captions) -> [B]``: a ``Scorer`` is that callable.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jaxpref.data import shapes
from jaxpref.rewards import preprocess
from jaxpref.rewards.aesthetic import load_aesthetic
from jaxpref.rewards.clip_rewards import (CLIPBackbone, aesthetic_scorer, aesthetic_scores, clipscore_scorer,
                                          hpsv2_scorer, load_hf_clip, pickscore_scorer)
from jaxpref.rewards.openclip import load_hpsv2
from jaxpref.rewards.scorer import Scorer, check_batch

REWARDS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward", "shapes")
NEEDS_PATH = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")


def shapes_scorer(batch_size: int = 256) -> Scorer:
    """The shapes world's exact reward in [0, 1] (jaxpref.data.shapes.reward_batch)."""
    return Scorer("shapes", lambda images, prompts: shapes.reward_batch(images, prompts), batch_size=batch_size,
                  pad_batches=False, description="shapes world: analytic caption/image match in [0, 1]")


def imagereward_scorer(path: Optional[str] = None) -> Scorer:
    """ImageReward (Xu et al. 2023) is not implemented here, on purpose and visibly.

    Its backbone is BLIP: a ViT-L/16 image encoder plus a BERT-base text encoder with cross-attention
    layers (``med_config.json``), followed by a 5-layer MLP head, with scores standardized by the mean
    and std from its training set. None of that exists in jaxpref's model code (we have CLIP, the SD
    UNet and VAE). Porting it needs: a Flax BLIP vision transformer and BERT-with-cross-attention, a
    name map from THUDM's ``ImageReward.pt``, BLIP's 224px preprocessing and BERT tokenizer, and a
    parity test against the ``image-reward`` package. Until then, score ImageReward with that package
    on the PNGs ``jaxpref.evaluate`` writes.
    """
    raise NotImplementedError(
        "reward 'imagereward': needs a JAX port of BLIP (ViT-L/16 image encoder + BERT-base with cross-attention, "
        "from THUDM's ImageReward.pt and med_config.json) and its MLP head, which jaxpref does not have; score the "
        f"written PNGs with the `image-reward` package instead (path given: {path!r})")


def load_scorer(name: str, path: Optional[str] = None, *, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
    """A ``Scorer`` for reward ``name`` from the local ``path`` (see the module docstring).

    Fails at once (ValueError naming the path and the expected contents) when the path is missing or
    holds something else, so an evaluation never generates images it then cannot score.
    """
    if name not in REWARDS:
        raise ValueError(f"reward {name!r} is not known; supported: {list(REWARDS)}")
    if name == "shapes":
        return shapes_scorer()
    if name == "imagereward":
        return imagereward_scorer(path)
    if name == "hpsv2":
        return hpsv2_scorer(load_hpsv2(path, dtype), batch_size)
    if name == "aesthetic":
        backbone, weight, bias = load_aesthetic(path, dtype)
        return aesthetic_scorer(backbone, weight, bias, batch_size)
    backbone = load_hf_clip(path, name, dtype=dtype)
    return pickscore_scorer(backbone, batch_size) if name == "pickscore" else clipscore_scorer(backbone, batch_size)


def parse_reward_specs(spec: str) -> list[tuple[str, Optional[str]]]:
    """"pickscore=/ckpt/PickScore_v1,shapes" -> [("pickscore", "/ckpt/PickScore_v1"), ("shapes", None)]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"--reward: {name!r} is not known; supported: {list(REWARDS)} as name or name=PATH")
        if name in NEEDS_PATH and not path:
            raise ValueError(f"--reward: {name} needs a local model path, as {name}=/path/to/folder")
        out.append((name, path or None))
    return out


def load_scorers(spec: str, *, batch_size: int = 32, dtype=jnp.float32) -> dict[str, Scorer]:
    """All scorers of a --reward spec, loaded up front (bad paths fail before any generation)."""
    return {name: load_scorer(name, path, batch_size=batch_size, dtype=dtype)
            for name, path in parse_reward_specs(spec)}


__all__ = ["Scorer", "CLIPBackbone", "load_scorer", "load_scorers", "parse_reward_specs", "shapes_scorer",
           "imagereward_scorer", "pickscore_scorer", "clipscore_scorer", "hpsv2_scorer", "aesthetic_scorer",
           "aesthetic_scores", "load_hf_clip", "check_batch", "preprocess", "REWARDS"]
