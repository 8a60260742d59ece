"""A Stable Diffusion (1.x / 2.x) diffusers folder <-> our Flax parts.

``load_pipeline`` reads unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers
``StableDiffusionPipeline`` folder; ``save_pipeline`` writes one back (e.g. with fine-tuned UNet
params) that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads, so trained models leave
this repo in the format everyone else uses. ``resolve_model_path`` turns the model name "embedded:tiny" into
the tiny SD folder shipped in the package (jaxpref/assets/tiny_sd).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from typing import Any

import jax.numpy as jnp

from jaxpref.models import clip, unet as unet_lib, vae as vae_lib

Dtype = Any

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Optional components of a StableDiffusionPipeline that we neither need nor write.
_OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")

EMBEDDED_TINY = "embedded:tiny"
# The shipped tiny model (written by ``python -m jaxpref.tiny.train_base``).
TINY_SD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny_sd")


@dataclasses.dataclass(frozen=True)
class SDPipeline:
    """The parts of an SD pipeline: Flax modules with their (fp32) params, tokenizer, scheduler config."""
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_encoder_params: Any
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    folder: str


def resolve_model_path(path: str) -> str:
    """"embedded:tiny" -> the tiny SD folder shipped in the package; anything else unchanged."""
    if path == EMBEDDED_TINY:
        if not os.path.isdir(TINY_SD_DIR):
            raise ValueError(f"model path '{EMBEDDED_TINY}': the shipped tiny model is missing at {TINY_SD_DIR}; "
                             "regenerate it with `python -m jaxpref.tiny.train_base`")
        return TINY_SD_DIR
    return path


def _read_model_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder does not exist"
        raise ValueError(f"{path}: missing (expected a diffusers StableDiffusionPipeline folder); found {found}")
    with open(path) as f:
        index = json.load(f)
    missing = [c for c in _REQUIRED if not (isinstance(index.get(c), list) and index[c][0] is not None)]
    if missing:
        raise ValueError(f"{path}: components {missing} are missing or null; an SD pipeline needs {list(_REQUIRED)}")
    extra = [k for k, v in index.items() if not k.startswith("_") and k not in _REQUIRED + _OPTIONAL
             and isinstance(v, list) and v[0] is not None]
    if extra:
        raise ValueError(f"{path}: components {extra} are not supported by load_pipeline (only "
                         f"{list(_REQUIRED)}; an SDXL folder has text_encoder_2 and needs its own loader)")
    for component in _REQUIRED:
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub):
            raise ValueError(f"{sub}: missing, though model_index.json lists {component} as {index[component]}")
    return index


def load_pipeline(folder: str, dtype: Dtype = jnp.float32) -> SDPipeline:
    """Reads a diffusers SD pipeline folder; ``dtype`` is the compute dtype of all three models."""
    from transformers import CLIPTokenizer

    _read_model_index(folder)
    unet, unet_params = unet_lib.load_unet(os.path.join(folder, "unet"), dtype)
    vae, vae_params = vae_lib.load_vae(os.path.join(folder, "vae"), dtype)
    text_encoder, text_params = clip.load_text_encoder(os.path.join(folder, "text_encoder"), dtype)
    tokenizer_dir = os.path.join(folder, "tokenizer")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{tokenizer_dir}: cannot load a CLIPTokenizer ({e}); expected vocab.json + merges.txt "
                         "or tokenizer.json") from e
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_path):
        raise ValueError(f"{scheduler_path}: missing scheduler config")
    with open(scheduler_path) as f:
        scheduler_config = json.load(f)
    return SDPipeline(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                      scheduler_config, folder)


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.30.0"


def save_pipeline(folder: str, pipeline: SDPipeline, unet_params=None) -> None:
    """Writes a full diffusers StableDiffusionPipeline folder (fp32 safetensors, no safety checker).

    ``unet_params`` (e.g. the fine-tuned ones) replace ``pipeline.unet_params`` when given.
    """
    unet_params = pipeline.unet_params if unet_params is None else unet_params
    os.makedirs(folder, exist_ok=True)
    unet_lib.save_unet(os.path.join(folder, "unet"), pipeline.unet, unet_params)
    vae_lib.save_vae(os.path.join(folder, "vae"), pipeline.vae, pipeline.vae_params)
    clip.save_text_encoder(os.path.join(folder, "text_encoder"), pipeline.text_encoder,
                           pipeline.text_encoder_params)
    pipeline.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler_class = pipeline.scheduler_config.get("_class_name", "PNDMScheduler")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**pipeline.scheduler_config, "_class_name": scheduler_class}, f, indent=2, sort_keys=True)
    text_class = "CLIPTextModelWithProjection" if pipeline.text_encoder.with_projection else "CLIPTextModel"
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", text_class], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
