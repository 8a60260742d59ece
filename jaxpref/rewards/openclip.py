"""OpenCLIP checkpoints (HPSv2's ViT-H-14) -> our HF-layout ``CLIPModel``, by a name table.

open_clip's ``CLIP`` and HF's ``CLIPModel`` compute the same function with different names:

  open_clip                                        ours (HF names)
  visual.conv1.weight                              vision_model.embeddings.patch_embedding.weight
  visual.class_embedding                           vision_model.embeddings.class_embedding
  visual.positional_embedding                      vision_model.embeddings.position_embedding.weight
  visual.ln_pre                                    vision_model.pre_layrnorm
  visual.transformer.resblocks.N.ln_1 / ln_2       vision_model.encoder.layers.N.layer_norm1 / layer_norm2
  ....attn.in_proj_weight [3D, D] (+ _bias)        ....self_attn.{q,k,v}_proj.weight (rows split in 3)
  ....attn.out_proj                                ....self_attn.out_proj
  ....mlp.c_fc / mlp.c_proj                        ....mlp.fc1 / mlp.fc2
  visual.ln_post                                   vision_model.post_layernorm
  visual.proj [D, E]  (used as x @ proj)           visual_projection.weight [E, D] (= proj.T)
  token_embedding.weight                           text_model.embeddings.token_embedding.weight
  positional_embedding                             text_model.embeddings.position_embedding.weight
  transformer.resblocks.N...                       text_model.encoder.layers.N...
  ln_final                                         text_model.final_layer_norm
  text_projection [D, E]  (x @ proj)               text_projection.weight [E, D] (= .T)
  logit_scale                                      logit_scale

Semantics that must match too: ViT-H-14 uses exact GELU (not CLIP's quick_gelu) in both towers; the
vision tower pools the class token after ln_post (open_clip applies ln_post to all tokens, then takes
token 0: the same for a per-token LayerNorm); the text tower pools at argmax(token id) (the EOT token
has the largest id), which our text model does for ``eos_token_id=2`` (transformers' legacy rule).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import clip, weights
from jaxpref.rewards import preprocess as pp
from jaxpref.rewards.clip_rewards import CLIPBackbone, load_tokenizer, require_folder
from jaxpref.rewards.state_dicts import find_weights_file, read_state_dict

# open_clip's model_configs/ViT-H-14.json (HPSv2 and HPSv2.1 use it unchanged).
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
HPSV2_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "HPS_v2.1_compressed.safetensors",
               "HPS_v2_compressed.safetensors", "HPS_v2.1_compressed.npz", "HPS_v2_compressed.npz",
               "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONFIG_FILES = ("open_clip_config.json", "config.json")

# open_clip config keys we honour, and those accepted only at the value that keeps the architecture ours.
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_INERT_KEYS = {"patch_dropout", "pad_id", "hf_tokenizer_name", "tokenizer_kwargs", "output_tokens",
               "act_kwargs", "norm_kwargs", "timm_model_pretrained"}  # no effect on an eval forward pass
_FIXED = {"ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,),
          "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,), "embed_cls": (False,),
          "no_causal_mask": (False,), "proj_type": ("linear", None), "proj_bias": (False,),
          "timm_model_name": (None,), "hf_model_name": (None,), "input_patchnorm": (False,),
          "global_average_pool": (False,), "pool_type": ("tok", "argmax")}


def _check_tower(cfg: Mapping[str, Any], known: set, what: str, source: str) -> None:
    for key, value in cfg.items():
        if key in known or key in _INERT_KEYS:
            continue
        if key in _FIXED:
            if value not in _FIXED[key]:
                raise ValueError(f"{source}: {what}.{key}={value!r} is not supported (supported: {_FIXED[key]})")
            continue
        raise ValueError(f"{source}: unknown open_clip {what} key {key!r}; supported: {sorted(known | set(_FIXED))}")
    pool = cfg.get("pool_type")
    if pool is not None and pool != ("tok" if what == "vision_cfg" else "argmax"):
        raise ValueError(f"{source}: {what}.pool_type={pool!r} is not supported")


def hf_config_from_openclip(cfg: Mapping[str, Any], source: str = "open_clip config") -> dict:
    """An open_clip model config (model_configs/*.json form) -> an HF CLIPConfig dict for ``clip_from_config``."""
    cfg = dict(cfg.get("model_cfg", cfg))  # HF-hub open_clip repos wrap it as {"model_cfg": ...}
    unknown = sorted(set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
                                 "cast_dtype", "init_logit_scale", "init_logit_bias"})
    if unknown:
        raise ValueError(f"{source}: unknown open_clip model config keys {unknown}")
    vision, text = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    _check_tower(vision, _VISION_KEYS, "vision_cfg", source)
    _check_tower(text, _TEXT_KEYS, "text_cfg", source)
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    embed = int(cfg["embed_dim"])
    v_width, t_width = int(vision.get("width", 768)), int(text.get("width", 512))
    head_width = int(vision.get("head_width", 64))
    if v_width % head_width:
        raise ValueError(f"{source}: vision width {v_width} is not a multiple of head_width {head_width}")
    return {
        "model_type": "clip", "projection_dim": embed,
        "vision_config": {"hidden_size": v_width, "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
                          "projection_dim": embed, "num_hidden_layers": int(vision.get("layers", 12)),
                          "num_attention_heads": v_width // head_width,
                          "image_size": int(vision.get("image_size", 224)),
                          "patch_size": int(vision.get("patch_size", 16)), "hidden_act": act},
        "text_config": {"vocab_size": int(text.get("vocab_size", 49408)), "hidden_size": t_width,
                        "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)), "projection_dim": embed,
                        "num_hidden_layers": int(text.get("layers", 12)),
                        "num_attention_heads": int(text.get("heads", 8)),
                        "max_position_embeddings": int(text.get("context_length", 77)), "hidden_act": act,
                        # eos_token_id=2: pool at argmax(ids), open_clip's "argmax" text pooling.
                        "eos_token_id": 2, "bos_token_id": 49406, "pad_token_id": 0},
    }


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = re.compile(r"(^|\.)attn_mask$")  # a causal-mask buffer some open_clip versions saved


def _rename_block(key: str, value: np.ndarray, out: dict, unused: list) -> None:
    vis, layer, rest = _BLOCK.match(key).groups()
    prefix = f"{'vision_model' if vis else 'text_model'}.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        suffix = "weight" if rest.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{prefix}self_attn.{name}.{suffix}"] = part
        return
    module, _, leaf = rest.rpartition(".")
    if module not in _BLOCK_PARTS:
        unused.append(key)
        return
    out[f"{prefix}{_BLOCK_PARTS[module]}.{leaf}"] = value


def openclip_to_hf(state_dict: Mapping[str, np.ndarray], source: str = "open_clip state dict") -> dict:
    """open_clip names/layouts -> HF CLIPModel names/layouts (torch conventions: Linear weight [out, in])."""
    out, unused = {}, []
    for key, value in state_dict.items():
        value = np.asarray(value)
        if _IGNORED.search(key):
            continue
        if _BLOCK.match(key):
            _rename_block(key, value, out, unused)
        elif key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T  # open_clip: x @ proj; a torch Linear stores proj.T
        else:
            unused.append(key)
    if unused:
        raise ValueError(f"{source}: open_clip tensors with no place in a plain CLIP (a different architecture?): "
                         f"{sorted(unused)[:10]}")
    return out


def load_openclip(weights_path: str, config: Mapping[str, Any], dtype=jnp.float32) -> tuple[clip.CLIPModel, Any]:
    """An open_clip CLIP checkpoint (any of state_dicts.SUFFIXES) + its model config -> (module, params)."""
    module = clip.clip_from_config(hf_config_from_openclip(config, weights_path), dtype)
    tensors = openclip_to_hf(read_state_dict(weights_path), weights_path)
    t, v = module.text_config, module.vision_config
    ids = jax.ShapeDtypeStruct((1, t.max_position_embeddings), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, pixels)["params"]
    params = weights.convert_torch_to_flax(tensors, shapes, weights_path, dtype=np.float32)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def read_openclip_config(folder: str) -> dict:
    """``open_clip_config.json`` (or an open_clip-style ``config.json``) in ``folder``, else ViT-H-14's."""
    for name in CONFIG_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            if "model_cfg" in config or "vision_cfg" in config:
                return config
    return VIT_H_14


def hpsv2_preprocess(image_size: int = 224) -> pp.Preprocess:
    """HPSv2's ``preprocess_val``: open_clip ResizeMaxSize (longest side, black padding), OpenAI mean/std."""
    return pp.Preprocess(size=image_size, crop=image_size, mode="pad")


def load_hpsv2(path: str, dtype=jnp.float32, weights_file: Optional[str] = None) -> CLIPBackbone:
    """An HPSv2 folder: the checkpoint (HPS_v2[.1]_compressed.pt, or a .safetensors/.npz copy), the CLIP
    tokenizer files (vocab.json + merges.txt, here or in tokenizer/), and optionally open_clip_config.json
    (default: ViT-H-14). ``path`` may also be the checkpoint file itself, with the tokenizer beside it."""
    expected = ("a folder with HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (or a .safetensors/.npz copy) and "
                "CLIP tokenizer files (vocab.json + merges.txt)")
    path = require_folder(path, "HPSv2", expected)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights_path = weights_file or (path if os.path.isfile(path) else find_weights_file(folder, HPSV2_FILES, "HPSv2"))
    module, params = load_openclip(weights_path, read_openclip_config(folder), dtype)
    tokenizer = load_tokenizer(folder, "HPSv2")
    return CLIPBackbone(module, params, tokenizer, hpsv2_preprocess(module.vision_config.image_size), weights_path)
