"""CLIP-based rewards in JAX: PickScore, CLIP score, HPSv2, LAION aesthetic (docs/methods.md §5).

All four are "embed the image (and the prompt) with a CLIP, then a formula on the embeddings":

- PickScore (Kirstain et al. 2023; yuvalkirstain/PickScore_v1, an HF CLIPModel of ViT-H/14):
  ``exp(logit_scale) * cos(image, text)``, as its reference code computes it (≈ 21 for SD1.5).
- CLIP score: ``w * max(cos, 0)`` with w = 100, torchmetrics' ``CLIPScore`` per image (torchmetrics
  reports the clamped mean over a batch; our per-image scores average to the same number whenever
  no cosine is negative, which is every realistic image/prompt pair). Default backbone in the
  literature: openai/clip-vit-large-patch14.
- HPSv2 / v2.1 (Wu et al. 2023): OpenCLIP ViT-H-14 fine-tuned, ``100 * cos`` (the benchmark's
  numbers; its ``score()`` function returns the bare cosine). Loaded from the open_clip state dict by
  ``openclip.py``.
- LAION aesthetic (sa_0_4_vit_l_14_linear): ``w · normalize(image_embeds) + b`` on OpenAI CLIP ViT-L/14.

Images go through ``preprocess.py`` on the host (the reference pixels), then one jitted function
computes the embeddings and the cosine; text is tokenized with the folder's own CLIP tokenizer,
padded to the text tower's length. Padding is safe: the text tower is causal and pools at the EOS
token, so tokens after it never reach the pooled state (why PickScore's ``padding=True`` and our
fixed-length padding give the same embedding).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.data.tokenizer import tokenize
from jaxpref.models import clip
from jaxpref.rewards import preprocess as pp
from jaxpref.rewards.scorer import Scorer

CLIPSCORE_WEIGHT = 100.0
HPS_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class CLIPBackbone:
    """A CLIP with what it needs around it: params, tokenizer (None: image-only use), preprocessing."""
    module: clip.CLIPModel
    params: Any
    tokenizer: Any
    preprocess: pp.Preprocess
    source: str

    @property
    def max_length(self) -> int:
        return self.module.text_config.max_position_embeddings

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> input_ids int32 [B, max_length] (truncated, padded after the EOS token)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this CLIP was loaded without a tokenizer (image features only)")
        return tokenize(self.tokenizer, prompts, self.max_length)

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> normalized float32 [B, S, S, 3] for the vision tower."""
        side = self.module.vision_config.image_size
        if self.preprocess.output_size != side:
            raise ValueError(f"{self.source}: preprocessing yields {self.preprocess.output_size}px images but the "
                             f"vision tower takes image_size={side}")
        return pp.preprocess(images, self.preprocess)


# ---------------------------------------------------------------------------------------------
# Loading.

def require_folder(path: Optional[str], what: str, expected: str) -> str:
    """Fails at start, naming the path and what should be there, when a reward-model folder is absent."""
    if not path:
        raise ValueError(f"{what}: no path given; expected {expected}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such {what} path; expected {expected}")
    return path


def load_tokenizer(folder: str, what: str):
    """The CLIP tokenizer in ``folder`` or ``folder/tokenizer`` (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer

    for cand in (folder, os.path.join(folder, "tokenizer")):
        if any(os.path.isfile(os.path.join(cand, f)) for f in ("vocab.json", "tokenizer.json")):
            try:
                return CLIPTokenizer.from_pretrained(cand)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"{cand}: cannot load a CLIPTokenizer for {what} ({e})") from e
    raise ValueError(f"{folder}: {what} needs a CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json) in the "
                     "folder or its tokenizer/ subfolder; any CLIP BPE tokenizer works (they share one vocab), e.g. "
                     "copy the files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K or an SD model's tokenizer/")


def load_hf_clip(folder: str, what: str, *, dtype=jnp.float32, with_tokenizer: bool = True,
                 default_preprocess: Optional[pp.Preprocess] = None) -> CLIPBackbone:
    """An HF CLIPModel folder (config.json + model.safetensors [+ tokenizer, preprocessor_config.json])."""
    folder = require_folder(folder, what, "an HF CLIPModel folder (config.json, model.safetensors, tokenizer files)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: {what} expects an HF CLIPModel folder with config.json and model.safetensors; "
                         f"found {sorted(os.listdir(folder)) if os.path.isdir(folder) else 'a file'}")
    module, params = clip.load_clip(folder, dtype)
    tokenizer = load_tokenizer(folder, what) if with_tokenizer else None
    side = module.vision_config.image_size
    preprocess = pp.find_preprocess(folder, side, default_preprocess)
    return CLIPBackbone(module, params, tokenizer, preprocess, folder)


# ---------------------------------------------------------------------------------------------
# The jitted math (embeddings in float32 whatever the compute dtype).

def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_embeds(module: clip.CLIPModel, params, pixels: jax.Array) -> jax.Array:
    """pixels [B, S, S, 3] -> unit image embeddings [B, P]."""
    return _normalize(module.apply({"params": params}, pixels, method=clip.CLIPModel.get_image_features))


def text_embeds(module: clip.CLIPModel, params, input_ids: jax.Array) -> jax.Array:
    """input_ids [B, L] -> unit text embeddings [B, P]."""
    return _normalize(module.apply({"params": params}, input_ids, method=clip.CLIPModel.get_text_features))


def pair_cosine(module: clip.CLIPModel, params, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
    """cos(image_b, text_b) for each pair b: [B]."""
    return jnp.sum(image_embeds(module, params, pixels) * text_embeds(module, params, input_ids), axis=-1)


@functools.lru_cache(maxsize=None)
def _jitted(fn, module):
    """One compiled function per (formula, module): the module is static, params are an argument."""
    return jax.jit(functools.partial(fn, module))


def cosine_fn(backbone: CLIPBackbone) -> Callable[[np.ndarray, list], np.ndarray]:
    """(images uint8 [B, H, W, 3], prompts) -> cos [B] float32 (host arrays in and out)."""
    run = _jitted(pair_cosine, backbone.module)
    params = jax.device_put(backbone.params)

    def fn(images, prompts):
        return np.asarray(run(params, backbone.pixels(images), backbone.tokenize(prompts)), np.float32)

    return fn


def image_embeds_fn(backbone: CLIPBackbone) -> Callable[[np.ndarray], np.ndarray]:
    """images uint8 [B, H, W, 3] -> unit image embeddings [B, P] float32."""
    run = _jitted(image_embeds, backbone.module)
    params = jax.device_put(backbone.params)
    return lambda images: np.asarray(run(params, backbone.pixels(images)), np.float32)


# ---------------------------------------------------------------------------------------------
# Scorers.

def pickscore_scorer(backbone: CLIPBackbone, batch_size: int = 32) -> Scorer:
    """PickScore = exp(logit_scale) · cos (PickScore_v1: exp(logit_scale) ≈ 100)."""
    scale = float(np.exp(np.asarray(backbone.params["logit_scale"], np.float64)))
    cos = cosine_fn(backbone)
    return Scorer("pickscore", lambda images, prompts: scale * cos(images, prompts), batch_size=batch_size,
                  description=f"PickScore: exp(logit_scale)={scale:.4g} x cosine ({backbone.source})")


def clipscore_scorer(backbone: CLIPBackbone, batch_size: int = 32, weight: float = CLIPSCORE_WEIGHT) -> Scorer:
    """CLIP score = w · max(cos, 0), w = 100 (torchmetrics' CLIPScore, per image)."""
    cos = cosine_fn(backbone)
    return Scorer("clipscore", lambda images, prompts: weight * np.maximum(cos(images, prompts), 0.0),
                  batch_size=batch_size, description=f"CLIP score: {weight:g} x max(cosine, 0) ({backbone.source})")


def hpsv2_scorer(backbone: CLIPBackbone, batch_size: int = 32) -> Scorer:
    """HPSv2 = 100 · cos (the HPDv2 benchmark's scale)."""
    cos = cosine_fn(backbone)
    return Scorer("hpsv2", lambda images, prompts: HPS_SCALE * cos(images, prompts), batch_size=batch_size,
                  description=f"HPSv2: 100 x cosine ({backbone.source})")


def aesthetic_scores(unit_embeds: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    """The LAION linear head: unit image embeddings [B, D] -> w · e + b [B]."""
    return np.asarray(unit_embeds, np.float32) @ np.asarray(weight, np.float32).reshape(-1) + np.float32(bias)


def aesthetic_scorer(backbone: CLIPBackbone, weight: np.ndarray, bias: float, batch_size: int = 32) -> Scorer:
    """LAION aesthetic = linear head on the normalized CLIP ViT-L/14 image embedding (prompts unused)."""
    dim = backbone.module.projection_dim
    if np.asarray(weight).size != dim:
        raise ValueError(f"aesthetic head has {np.asarray(weight).size} inputs but the CLIP at {backbone.source} "
                         f"embeds to projection_dim={dim} (the LAION head expects ViT-L/14, 768)")
    embed = image_embeds_fn(backbone)
    return Scorer("aesthetic", lambda images, prompts: aesthetic_scores(embed(images), weight, bias),
                  batch_size=batch_size, description=f"LAION aesthetic linear head on {backbone.source}")
