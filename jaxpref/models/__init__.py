"""Our Flax Stable Diffusion models (UNet, VAE, CLIP), loading/saving diffusers/HF safetensors folders.

Names resolve lazily so importing one model does not import (and trace-check) the others.
"""
import importlib

_EXPORTS = {
    "UNet2DConditionModel": "unet", "load_unet": "unet", "save_unet": "unet", "unet_from_config": "unet",
    "AutoencoderKL": "vae", "load_vae": "vae", "save_vae": "vae",
    "CLIPModel": "clip", "CLIPTextModel": "clip", "load_clip": "clip", "load_text_encoder": "clip",
    "save_clip": "clip", "save_text_encoder": "clip",
    "SDPipeline": "pipeline", "load_pipeline": "pipeline", "save_pipeline": "pipeline",
    "resolve_model_path": "pipeline", "EMBEDDED_TINY": "pipeline",
    "SDXLTextEncoders": "conditioning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxpref.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxpref.models' has no attribute {name!r}")
