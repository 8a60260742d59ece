"""A Stable Diffusion (1.x / 2.x / XL) diffusers folder <-> our Flax parts.

``load_pipeline`` reads unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers
``StableDiffusionPipeline`` folder, plus text_encoder_2/ and tokenizer_2/ of a
``StableDiffusionXLPipeline`` one (the two encoders become one ``SDXLTextEncoders`` module, see
``jaxpref.models.conditioning``); ``save_pipeline`` writes one back (e.g. with fine-tuned UNet
params) that diffusers' ``from_pretrained`` loads, so trained models leave
this repo in the format everyone else uses. ``resolve_model_path`` turns the model name "embedded:tiny" into
the tiny SD folder shipped in the package (jaxpref/assets/tiny_sd).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import clip, conditioning, unet as unet_lib, vae as vae_lib

Dtype = Any

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Optional components of a StableDiffusionPipeline that we neither need nor write.
_OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")
_SDXL = ("text_encoder_2", "tokenizer_2")

EMBEDDED_TINY = "embedded:tiny"
# The shipped tiny model (written by ``python -m jaxpref.world.train_base``).
TINY_SD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny_sd")


class StubTokenizer:
    """What ``trainer.build_run`` asks of a tokenizer: ``model_max_length`` and __call__ -> input_ids, for runs
    built from shapes only (``jaxpref.aot``, the benchmarks' random models).

    Every caption becomes [BOS, EOS, EOS, ...] (the tokens of ""): shapes and costs do not depend on the words.
    """

    def __init__(self, max_length: int, bos: int, eos: int):
        self.model_max_length, self.bos, self.eos = max_length, bos, eos

    def __call__(self, texts, padding=None, max_length=None, truncation=None, return_tensors=None):
        ids = np.full((len(texts), max_length or self.model_max_length), self.eos, np.int32)
        ids[:, 0] = self.bos
        return {"input_ids": ids}


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
    tokenizer_2: Any = None  # SDXL only (text_encoder is then an SDXLTextEncoders holding both encoders)

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.text_encoder, conditioning.SDXLTextEncoders)


def resolve_model_path(path: str) -> str:
    """"embedded:tiny" -> the tiny SD folder shipped in the package; anything else unchanged."""
    if path == EMBEDDED_TINY:
        if not os.path.isdir(TINY_SD_DIR):
            raise ValueError(f"model path '{EMBEDDED_TINY}': the shipped tiny model is missing at {TINY_SD_DIR}; "
                             "regenerate it with `python -m jaxpref.world.train_base`")
        return TINY_SD_DIR
    return path


def shape_pipeline(unet, text_encoder, vae, scheduler_config: dict, folder: str) -> SDPipeline:
    """An ``SDPipeline`` of these modules whose UNet and text-encoder params are ShapeDtypeStructs (nothing
    allocated), no VAE params and a stub tokenizer (SDXL: ``text_encoder`` an ``SDXLTextEncoders``): what
    compiling a step for memory or FLOPs needs (the TPU fit check, the benchmarks' random models)."""
    sdxl = isinstance(text_encoder, conditioning.SDXLTextEncoders)
    text = (text_encoder.text_encoder if sdxl else text_encoder).config
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    text_shapes = jax.eval_shape(lambda: text_encoder.init(jax.random.PRNGKey(0), ids))["params"]
    tokenizer = StubTokenizer(text.max_position_embeddings, text.bos_token_id, text.eos_token_id)
    return SDPipeline(unet=unet, unet_params=unet_lib.unet_param_shapes(unet), vae=vae, vae_params=None,
                      text_encoder=text_encoder, text_encoder_params=text_shapes, tokenizer=tokenizer,
                      scheduler_config=dict(scheduler_config), folder=folder, tokenizer_2=tokenizer if sdxl else None)


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
    present = lambda c: isinstance(index.get(c), list) and index[c][0] is not None
    extra = [k for k in index if not k.startswith("_") and k not in _REQUIRED + _OPTIONAL + _SDXL and present(k)]
    if extra:
        raise ValueError(f"{path}: components {extra} are not supported by load_pipeline (only "
                         f"{list(_REQUIRED + _SDXL)})")
    sdxl = [c for c in _SDXL if present(c)]
    if sdxl and len(sdxl) != len(_SDXL):
        raise ValueError(f"{path}: an SDXL pipeline needs both {list(_SDXL)}; found only {sdxl}")
    for component in _REQUIRED + tuple(sdxl):
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub):
            raise ValueError(f"{sub}: missing, though model_index.json lists {component} as {index[component]}")
    return index


def _load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load a CLIPTokenizer ({e}); expected vocab.json + merges.txt "
                         "or tokenizer.json") from e


def load_pipeline(folder: str, dtype: Dtype = jnp.float32, *, vae_path: str = "",
                  vae_dtype: Dtype | None = None) -> SDPipeline:
    """Reads a diffusers SD or SDXL pipeline folder; ``dtype`` is the compute dtype of the UNet and the text
    encoders, ``vae_dtype`` the VAE's (default ``dtype``). ``vae_path``: a VAE folder used instead of the
    pipeline's vae/ (e.g. SDXL's fp16-fix VAE, which stays finite in half precision)."""
    index = _read_model_index(folder)
    unet, unet_params = unet_lib.load_unet(os.path.join(folder, "unet"), dtype)
    vae_folder = vae_path or os.path.join(folder, "vae")
    if vae_path and not os.path.isfile(os.path.join(vae_path, "config.json")):
        raise ValueError(f"vae_path={vae_path!r}: no config.json there (expected a diffusers AutoencoderKL folder)")
    vae, vae_params = vae_lib.load_vae(vae_folder, dtype if vae_dtype is None else vae_dtype)
    text_encoder, text_params = clip.load_text_encoder(os.path.join(folder, "text_encoder"), dtype)
    tokenizer = _load_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = None
    if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None:
        encoder_2, params_2 = clip.load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype)
        if not encoder_2.with_projection:
            raise ValueError(f"{folder}/text_encoder_2: expected CLIPTextModelWithProjection (its pooled "
                             "projection is SDXL's text_embeds)")
        tokenizer_2 = _load_tokenizer(os.path.join(folder, "tokenizer_2"))
        conditioning.check_tokenizers(tokenizer, tokenizer_2, folder)
        text_encoder = conditioning.SDXLTextEncoders(
            text_encoder, encoder_2, eos_token_id=int(tokenizer.eos_token_id),
            pad_token_id_2=int(tokenizer_2.pad_token_id),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        text_params = {"text_encoder": text_params, "text_encoder_2": params_2}
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_path):
        raise ValueError(f"{scheduler_path}: missing scheduler config")
    with open(scheduler_path) as f:
        scheduler_config = json.load(f)
    return SDPipeline(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                      scheduler_config, folder, tokenizer_2)


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.30.0"


def save_pipeline(folder: str, pipeline: SDPipeline, unet_params=None) -> None:
    """Writes a full diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) folder, fp32
    safetensors, no safety checker.

    ``unet_params`` (e.g. the fine-tuned ones) replace ``pipeline.unet_params`` when given.
    """
    unet_params = pipeline.unet_params if unet_params is None else unet_params
    os.makedirs(folder, exist_ok=True)
    unet_lib.save_unet(os.path.join(folder, "unet"), pipeline.unet, unet_params)
    vae_lib.save_vae(os.path.join(folder, "vae"), pipeline.vae, pipeline.vae_params)
    encoders = {"text_encoder": (pipeline.text_encoder, pipeline.text_encoder_params)}
    if pipeline.is_sdxl:
        encoders = {name: (getattr(pipeline.text_encoder, name), pipeline.text_encoder_params[name])
                    for name in ("text_encoder", "text_encoder_2")}
    for name, (module, params) in encoders.items():
        clip.save_text_encoder(os.path.join(folder, name), module, params)
    pipeline.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler_class = pipeline.scheduler_config.get("_class_name", "PNDMScheduler")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**pipeline.scheduler_config, "_class_name": scheduler_class}, f, indent=2, sort_keys=True)
    text_class = lambda m: "CLIPTextModelWithProjection" if m.with_projection else "CLIPTextModel"
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", text_class(encoders["text_encoder"][0])],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if pipeline.is_sdxl:
        pipeline.tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            index.pop(key)
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "force_zeros_for_empty_prompt": pipeline.text_encoder.force_zeros_for_empty_prompt})
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
