"""ImageReward (Xu et al. 2023, THUDM/ImageReward v1.0) in JAX, read from its published files without torch.

What ``ImageReward.score(prompt, image)`` of the ``image-reward`` package computes, and so do we:

1. pixels: torchvision ``Resize(224, bicubic)`` on the PIL image (shortest side), ``CenterCrop(224)``
   (offset ``round((h - 224) / 2)``), /255, OpenAI CLIP mean/std (``preprocess.Preprocess`` with
   ``crop_rounding="round"``);
2. image tokens: BLIP's ViT-L/16 (``models.blip.VisionTransformer``), all 197 tokens;
3. text: the ``bert-base-uncased`` tokenizer with BLIP's added ``[DEC]``/``[ENC]`` tokens, padded and
   truncated to 35 tokens; token 0 stays ``[CLS]`` (ImageReward, in training and inference, does not
   swap in ``[ENC]`` as BLIP's ITM head does); BERT-base with cross-attention to every image token
   (``models.blip.BertModel``), the state of token 0 read out;
4. the head ``MLP``: Linear 768-1024-128-64-16-1 with dropouts between and no activations (the ReLUs
   are commented out in the reference), then ``(r - MEAN) / STD`` with v1.0's published constants.

Files (``load_imagereward(path)``): a folder with ``ImageReward.pt`` (THUDM's state dict; a
``.safetensors``/``.npz`` copy works too) and ``med_config.json`` (``load_scorer`` fetches both for the
hub id THUDM/ImageReward), and the ``bert-base-uncased`` tokenizer files (``vocab.txt``, here or in
``tokenizer/`` or ``bert-base-uncased/``; else google-bert/bert-base-uncased's are fetched into the
Hugging Face cache, as the package's ``from_pretrained('bert-base-uncased')`` does). ``ImageReward.pt``
is a torch zip archive; ``torch_archive`` reads it with an Unpickler that resolves only tensor
rebuilders, storage types and OrderedDict (as ``torch.load(weights_only=True)`` allows), so no pickled
code runs and torch is not needed. The ViT's size comes from the tensors (pos_embed, patch conv, block count;
64-wide heads, as BLIP's ViTs have), the text tower's from ``med_config.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import hub
from jaxpref.models import blip, weights
from jaxpref.rewards import preprocess as pp
from jaxpref.rewards.clip_rewards import require_folder
from jaxpref.rewards.scorer import Scorer
from jaxpref.rewards.state_dicts import read_state_dict

# ImageReward v1.0 (ImageReward/ImageReward.py): the reward's mean and std over its training set.
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_LAYER_INDICES = (0, 2, 4, 6, 7)  # nn.Sequential slots of the Linears (the others are Dropouts)

WEIGHTS_FILES = ("ImageReward.pt", "ImageReward.safetensors", "ImageReward.npz")
MED_CONFIG = "med_config.json"
TOKENIZER_DIRS = ("", "tokenizer", "bert-base-uncased")
BERT_TOKENIZER_REPO = "google-bert/bert-base-uncased"
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")
# Tensors in ImageReward.pt that the score never uses: BLIP's contrastive projections, BERT's position ids.
_UNUSED = (r"^blip\.(vision_proj|text_proj)\.", r"position_ids$")


class RewardHead(nn.Module):
    """ImageReward's ``MLP``: features [B, D] -> raw reward [B] (Linears only; dropout is off in eval)."""
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        x = features.astype(jnp.float32)
        for index, width in zip(HEAD_LAYER_INDICES, HEAD_WIDTHS):
            x = nn.Dense(width, name=f"layers_{index}", dtype=jnp.float32, param_dtype=self.param_dtype)(x)
        return x[..., 0]


class BLIPTowers(nn.Module):
    """BLIP_Pretrain's two encoders under their state-dict names."""
    vision: blip.VisionConfig
    text: blip.TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_encoder = blip.VisionTransformer(self.vision, **kw)
        self.text_encoder = blip.BertModel(self.text, **kw)


class ImageRewardModel(nn.Module):
    """(pixels [B, S, S, 3], input_ids [B, L], attention_mask [B, L]) -> normalized reward [B] float32."""
    vision: blip.VisionConfig = blip.VisionConfig()
    text: blip.TextConfig = blip.TextConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.blip = BLIPTowers(self.vision, self.text, self.dtype, self.param_dtype)
        self.mlp = RewardHead(self.param_dtype)

    def image_tokens(self, pixels):
        """pixels -> the ViT's output tokens [B, N, W] float32."""
        return self.blip.visual_encoder(pixels).astype(jnp.float32)

    def text_features(self, input_ids, attention_mask, image_tokens):
        """Token 0's last hidden state [B, D] float32, the text having attended to ``image_tokens``."""
        return self.blip.text_encoder(input_ids, attention_mask, image_tokens)[:, 0].astype(jnp.float32)

    def raw_reward(self, features):
        return self.mlp(features)

    def __call__(self, pixels, input_ids, attention_mask):
        features = self.text_features(input_ids, attention_mask, self.image_tokens(pixels))
        return (self.raw_reward(features) - MEAN) / STD


# ---------------------------------------------------------------------------------------------
# Loading.

@dataclasses.dataclass(frozen=True)
class ImageRewardBackbone:
    """A loaded ImageReward: the model, its params, the BERT tokenizer and the pixel preprocessing."""
    module: ImageRewardModel
    params: Any
    tokenizer: Any
    preprocess: pp.Preprocess
    source: str

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (input_ids, attention_mask) int32 [B, 35], as ImageReward tokenizes."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                             return_tensors="np")
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> normalized float32 [B, S, S, 3]."""
        return pp.preprocess(images, self.preprocess)


def imagereward_preprocess(image_size: int = 224) -> pp.Preprocess:
    """``Resize(S, bicubic)`` + torchvision ``CenterCrop(S)`` (round) + OpenAI CLIP mean/std."""
    return pp.Preprocess(size=image_size, crop=image_size, crop_rounding="round")


def vision_config_from_tensors(tensors: Mapping[str, np.ndarray], source: str) -> blip.VisionConfig:
    """The ViT's size from its tensors (ImageReward.pt carries no vision config)."""
    prefix = "blip.visual_encoder."
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if prefix + key not in tensors:
            raise ValueError(f"{source}: no tensor {prefix + key}; expected THUDM's ImageReward state dict "
                             "(blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)")
    width, _, patch, _ = tensors[prefix + "patch_embed.proj.weight"].shape
    grid = int(round((tensors[prefix + "pos_embed"].shape[1] - 1) ** 0.5))
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    if width % blip.BLIP_HEAD_DIM:
        raise ValueError(f"{source}: ViT width {width} is not a multiple of BLIP's head width {blip.BLIP_HEAD_DIM}")
    return blip.VisionConfig(image_size=grid * patch, patch_size=patch, width=width, depth=len(blocks),
                             num_heads=width // blip.BLIP_HEAD_DIM)


def tokenizer_folder(folder: str, announce=print) -> str:
    """Where the BERT tokenizer files are: ``folder`` (or its tokenizer/ or bert-base-uncased/), else, as the
    package's ``BertTokenizer.from_pretrained('bert-base-uncased')`` does, that repository's tokenizer files
    fetched into the Hugging Face cache (THUDM/ImageReward does not ship them)."""
    for sub in TOKENIZER_DIRS:
        cand = os.path.join(folder, sub)
        if any(os.path.isfile(os.path.join(cand, f)) for f in ("vocab.txt", "tokenizer.json")):
            return cand
    key = f"ImageReward tokenizer (no vocab.txt in {folder} or its {'/, '.join(s for s in TOKENIZER_DIRS if s)}/)"
    listing = hub.list_files(hub.HubRef(BERT_TOKENIZER_REPO), key=key)
    files = [f for f in BERT_TOKENIZER_FILES if f in listing.files]
    return hub.fetch(listing, files, key=key, announce=announce)


def load_bert_tokenizer(folder: str, announce=print):
    """``bert-base-uncased``'s tokenizer with BLIP's two added tokens (``blip.init_tokenizer``)."""
    from transformers import BertTokenizer

    folder = tokenizer_folder(folder, announce)
    try:
        tokenizer = BertTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load a BertTokenizer for ImageReward ({e})") from e
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _read_med_config(folder: str) -> blip.TextConfig:
    path = os.path.join(folder, MED_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: ImageReward needs {MED_CONFIG} (THUDM/ImageReward's BERT config) beside "
                         "the weights")
    try:
        with open(path) as f:
            return blip.text_config_from_med(json.load(f), path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _find_weights(folder: str) -> str:
    for name in WEIGHTS_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"{folder}: no ImageReward weights; expected one of {list(WEIGHTS_FILES)}")


def load_imagereward(path: Optional[str], dtype=jnp.float32) -> ImageRewardBackbone:
    """The folder layout of the module docstring (``path`` may also be the weights file in that folder)."""
    expected = (f"a folder with ImageReward.pt (or .safetensors/.npz), {MED_CONFIG} and the bert-base-uncased "
                "tokenizer (vocab.txt)")
    path = require_folder(path, "ImageReward", expected)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    text = _read_med_config(folder)
    tokenizer = load_bert_tokenizer(folder)
    weights_path = path if os.path.isfile(path) else _find_weights(folder)
    tensors = read_state_dict(weights_path)
    vision = vision_config_from_tensors(tensors, weights_path)
    module = ImageRewardModel(vision, text, dtype=dtype)
    pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, MAX_TEXT_LENGTH), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels, ids, ids)["params"]
    params = weights.convert_torch_to_flax(tensors, shapes, weights_path, dtype=np.float32, ignore=_UNUSED)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return ImageRewardBackbone(module, params, tokenizer, imagereward_preprocess(vision.image_size), weights_path)


# ---------------------------------------------------------------------------------------------
# Scorer.

def score_pairs(module: ImageRewardModel, params, pixels, input_ids, attention_mask) -> jax.Array:
    return module.apply({"params": params}, pixels, input_ids, attention_mask)


@functools.lru_cache(maxsize=None)
def compiled_score(module: ImageRewardModel):
    """One jitted ``score_pairs`` per model config; params are an argument, so reloaded weights reuse it."""
    return jax.jit(functools.partial(score_pairs, module))


def imagereward_scorer(backbone: ImageRewardBackbone, batch_size: int = 32) -> Scorer:
    """ImageReward v1.0: (MLP(BLIP text-with-image features) - mean) / std, one number per pair."""
    run = compiled_score(backbone.module)
    params = jax.device_put(backbone.params)

    def fn(images, prompts):
        ids, mask = backbone.tokenize(prompts)
        return np.asarray(run(params, backbone.pixels(images), ids, mask), np.float32)

    return Scorer("imagereward", fn, batch_size=batch_size,
                  description=f"ImageReward v1.0: (MLP(BLIP features) - {MEAN:.4f}) / {STD:.4f} ({backbone.source})")
