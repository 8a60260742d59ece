"""Reward models behind one interface (docs/methods.md §5): ``load_scorer(name, path)(images, prompts) -> [B]``.

Names and what ``path`` must hold: a local folder (or file), or a Hugging Face hub id ``org/name[@rev][/sub]``
fetched into the Hugging Face cache by ``jaxpref.hub`` (safetensors and configs only; HPSv2, the aesthetic
head and ImageReward, published only as torch pickles, are fetched as the files named below and read as
tensors only, by ``state_dicts``/``torch_archive``, without running pickled code):

- "pickscore": an HF CLIPModel folder (yuvalkirstain/PickScore_v1) with CLIP tokenizer files and,
  ideally, laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json. exp(logit_scale)·cos.
- "clipscore": an HF CLIPModel folder (openai/clip-vit-large-patch14). 100·max(cos, 0) (torchmetrics).
- "hpsv2": HPS_v2[.1]_compressed.pt (or a .safetensors/.npz copy) + CLIP tokenizer files. 100·cos.
- "aesthetic": an HF CLIPModel of ViT-L/14 (the folder or its clip/ subfolder) + the LAION linear
  head sa_0_4_vit_l_14_linear.pth (or .safetensors/.npz).
- "imagereward": THUDM/ImageReward, or a folder with its ImageReward.pt (or a .safetensors/.npz copy) and
  med_config.json; the bert-base-uncased tokenizer (vocab.txt) there or in tokenizer/, else fetched from
  google-bert/bert-base-uncased. BLIP ViT-L/16 + BERT with cross-attention + MLP, v1.0's mean/std.
- "shapes": the shapes world's analytic reward; no path.

The data engineer's score builder and DRO's expert selection call a scorer as
``score_fn(images uint8 [B, H, W, 3], captions) -> [B]``: a ``Scorer`` is that callable.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jaxpref import hub
from jaxpref.world import shapes
from jaxpref.rewards import preprocess
from jaxpref.rewards.aesthetic import HEAD_FILES, load_aesthetic
from jaxpref.rewards.clip_rewards import (CLIPBackbone, aesthetic_scorer, aesthetic_scores, clipscore_scorer,
                                          hpsv2_scorer, load_hf_clip, pickscore_scorer)
from jaxpref.rewards.imagereward import WEIGHTS_FILES as IMAGEREWARD_FILES
from jaxpref.rewards.imagereward import imagereward_scorer, load_imagereward
from jaxpref.rewards.openclip import HPSV2_FILES, load_hpsv2
from jaxpref.rewards.scorer import Scorer, check_batch

REWARDS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward", "shapes")
NEEDS_PATH = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")
# Reward weights published only as torch pickles: the hub files fetched for them (read as tensors only).
HUB_PICKLES = {"hpsv2": HPSV2_FILES, "aesthetic": HEAD_FILES, "imagereward": IMAGEREWARD_FILES}


def shapes_scorer(batch_size: int = 256) -> Scorer:
    """The shapes world's exact reward in [0, 1] (jaxpref.world.shapes.reward_batch)."""
    return Scorer("shapes", lambda images, prompts: shapes.reward_batch(images, prompts), batch_size=batch_size,
                  pad_batches=False, description="shapes world: analytic caption/image match in [0, 1]")


def resolve_reward_path(name: str, path: str, *, key: str = "--reward", announce=print) -> str:
    """The local folder or file of reward ``name``'s ``path`` (a hub id is fetched into the HF cache first)."""
    return hub.resolve(path, key=f"{key} {name}", components=None, pickles=HUB_PICKLES.get(name, ()),
                       announce=announce)


def resolve_reward_specs(spec: str, *, key: str = "--reward", announce=print) -> str:
    """The spec with every reward's hub id replaced by its local folder in the HF cache (fetched first)."""
    items = [name if path is None else f"{name}={resolve_reward_path(name, path, key=key, announce=announce)}"
             for name, path in parse_reward_specs(spec)]
    return ",".join(items)


def load_scorer(name: str, path: Optional[str] = None, *, batch_size: int = 32, dtype=jnp.float32) -> Scorer:
    """A ``Scorer`` for reward ``name`` from ``path``, a local path or a hub id (see the module docstring).

    Fails at once (ValueError naming the path and the expected contents) when the path is missing or
    holds something else, so an evaluation never generates images it then cannot score.
    """
    if name not in REWARDS:
        raise ValueError(f"reward {name!r} is not known; supported: {list(REWARDS)}")
    if name == "shapes":
        return shapes_scorer()
    if path:
        path = resolve_reward_path(name, path)
    if name == "imagereward":
        return imagereward_scorer(load_imagereward(path, dtype), batch_size)
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
            raise ValueError(f"--reward: {name} needs a model, as {name}=/path/to/folder or {name}=org/name (a "
                             "Hugging Face hub id)")
        out.append((name, path or None))
    return out


def load_scorers(spec: str, *, batch_size: int = 32, dtype=jnp.float32) -> dict[str, Scorer]:
    """All scorers of a --reward spec, loaded up front (bad paths fail before any generation)."""
    return {name: load_scorer(name, path, batch_size=batch_size, dtype=dtype)
            for name, path in parse_reward_specs(spec)}


__all__ = ["Scorer", "CLIPBackbone", "load_scorer", "load_scorers", "parse_reward_specs", "resolve_reward_specs",
           "resolve_reward_path", "shapes_scorer",
           "imagereward_scorer", "load_imagereward", "pickscore_scorer", "clipscore_scorer", "hpsv2_scorer",
           "aesthetic_scorer",
           "aesthetic_scores", "load_hf_clip", "check_batch", "preprocess", "REWARDS"]
