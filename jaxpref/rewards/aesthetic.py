"""The LAION aesthetic predictor (linear head, sa_0_4_vit_l_14_linear) on OpenAI CLIP ViT-L/14.

Reference (LAION-AI/aesthetic-predictor): ``f = clip.encode_image(preprocess(img))``,
``f /= f.norm(dim=-1, keepdim=True)``, ``score = nn.Linear(768, 1)(f)``. The head file is a torch state
dict {weight [1, 768], bias [1]}; the same two arrays in a .safetensors or .npz need no torch.

Folder layout ``load_aesthetic(path)`` reads: ``path/clip/`` (an HF CLIPModel folder of
openai/clip-vit-large-patch14) or ``path`` itself being that folder, plus the head file in ``path``.
Preprocessing: the folder's preprocessor_config.json if present, else OpenAI ``clip``'s own
(bicubic shortest-side resize + torchvision center crop).
"""
from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxpref.rewards import preprocess as pp
from jaxpref.rewards.clip_rewards import CLIPBackbone, load_hf_clip, require_folder
from jaxpref.rewards.state_dicts import read_state_dict

HEAD_FILES = ("sa_0_4_vit_l_14_linear.pth", "sa_0_4_vit_l_14_linear.safetensors", "sa_0_4_vit_l_14_linear.npz",
              "aesthetic_head.pth", "aesthetic_head.safetensors", "aesthetic_head.npz")


def read_linear_head(path: str) -> tuple[np.ndarray, float]:
    """(weight [D] float32, bias float) from a {weight [1, D], bias [1]} state dict file."""
    tensors = read_state_dict(path)
    if set(tensors) != {"weight", "bias"}:
        raise ValueError(f"{path}: expected the LAION linear aesthetic head {{weight [1, D], bias [1]}}; found keys "
                         f"{sorted(tensors)} (the MLP 'improved aesthetic predictor' is a different model)")
    weight, bias = np.asarray(tensors["weight"], np.float32), np.asarray(tensors["bias"], np.float32)
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.size != 1:
        raise ValueError(f"{path}: head shapes weight {weight.shape}, bias {bias.shape}; expected [1, D] and [1]")
    return weight[0], float(bias.reshape(()))


def find_head(folder: str) -> str:
    for name in HEAD_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"{folder}: no aesthetic head file; expected one of {list(HEAD_FILES)}")


def load_aesthetic(path: str, dtype=jnp.float32,
                   head_file: Optional[str] = None) -> tuple[CLIPBackbone, np.ndarray, float]:
    """(CLIP backbone without tokenizer, head weight [D], head bias) from the layout in the module docstring."""
    expected = ("a folder holding an HF CLIPModel of ViT-L/14 (itself or in clip/) and the head "
                f"{HEAD_FILES[0]} (or .safetensors/.npz)")
    path = require_folder(path, "aesthetic", expected)
    clip_folder = os.path.join(path, "clip") if os.path.isdir(os.path.join(path, "clip")) else path
    # OpenAI clip's preprocess: Resize(224, bicubic) + torchvision CenterCrop (round), same mean/std.
    default = pp.Preprocess(crop_rounding="round")
    backbone = load_hf_clip(clip_folder, "aesthetic", dtype=dtype, with_tokenizer=False, default_preprocess=default)
    weight, bias = read_linear_head(head_file or find_head(path))
    return backbone, weight, bias
