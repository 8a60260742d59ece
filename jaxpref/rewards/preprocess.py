"""CLIP image preprocessing on the host (numpy + Pillow), as each reward model's reference code runs it.

Reward numbers are only comparable with published ones when the pixels the CLIP tower sees are the
same, so resizing is Pillow's bicubic filter on uint8 images (what ``CLIPImageProcessor`` with the PIL
backend and torchvision's ``Resize`` on PIL images both call), not a JAX resize (no antialiasing
match). Two layouts exist:

- "crop": resize the shortest side to ``size`` (long side ``int(size * long / short)``), then center
  crop ``crop``x``crop``. ``CLIPImageProcessor`` (PickScore, CLIP score) puts the crop at
  ``(h - crop) // 2`` ("floor"); torchvision's ``CenterCrop`` (OpenAI ``clip`` preprocess, used by the
  LAION aesthetic predictor) at ``int(round((h - crop) / 2))`` ("round").
- "pad": resize the longest side to ``size`` (other side ``round(dim * scale)``) and pad to a square
  with black, centered (open_clip's ``ResizeMaxSize``, which HPSv2's ``preprocess_val`` uses).

For square images (every generation here) all of these are one bicubic resize to ``size``x``size``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("crop", "pad")
ROUNDINGS = ("floor", "round")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What happens to uint8 pixels before the CLIP vision tower (see the module docstring)."""
    size: int = 224
    crop: int = 224
    mode: str = "crop"
    crop_rounding: str = "floor"
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1.0 / 255.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Preprocess.mode={self.mode!r}; supported: {MODES}")
        if self.crop_rounding not in ROUNDINGS:
            raise ValueError(f"Preprocess.crop_rounding={self.crop_rounding!r}; supported: {ROUNDINGS}")

    @property
    def output_size(self) -> int:
        return self.size if self.mode == "pad" or not self.do_center_crop else self.crop


def _edge(value: Any, key: str, path: str) -> int:
    """An HF size entry (int, {"shortest_edge": n} or {"height": n, "width": n}) -> n (square only)."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(f"{path}: {key}={value!r} is not supported; expected an int, {{'shortest_edge': n}} or a "
                     "square {'height': n, 'width': n}")


def from_preprocessor_config(config: Mapping[str, Any] | str, image_size: int = 224) -> Preprocess:
    """A ``Preprocess`` from an HF ``preprocessor_config.json`` (dict or path): CLIPImageProcessor semantics.

    Missing keys take CLIPImageProcessor's defaults with ``image_size`` (the vision tower's input side).
    """
    path = "preprocessor config"
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        with open(path) as f:
            config = json.load(f)
    if config.get("do_convert_rgb") is False:
        raise ValueError(f"{path}: do_convert_rgb=False is not supported (images are RGB uint8 here)")
    if config.get("do_rescale") is False:
        raise ValueError(f"{path}: do_rescale=False is not supported (uint8 inputs must be rescaled)")
    size = _edge(config.get("size", image_size), "size", path)
    crop = _edge(config.get("crop_size", size), "crop_size", path)
    return Preprocess(size=size, crop=crop, mode="crop", crop_rounding="floor",
                      mean=tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
                      std=tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
                      resample=int(config.get("resample", 3)), do_resize=bool(config.get("do_resize", True)),
                      do_center_crop=bool(config.get("do_center_crop", True)),
                      do_normalize=bool(config.get("do_normalize", True)),
                      rescale_factor=float(config.get("rescale_factor", 1.0 / 255.0)))


def find_preprocess(folder: str, image_size: int, default: Optional[Preprocess] = None) -> Preprocess:
    """``folder/preprocessor_config.json`` if present, else ``default`` (CLIP's if None) at ``image_size``."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        return from_preprocessor_config(path, image_size)
    return dataclasses.replace(default or Preprocess(), size=image_size, crop=image_size)


def _resize_crop(img: Image.Image, p: Preprocess) -> Image.Image:
    w, h = img.size
    if p.do_resize:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = p.size, int(p.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize((new_w, new_h), resample=p.resample)
        w, h = img.size
    if p.do_center_crop:
        if h < p.crop or w < p.crop:
            raise ValueError(f"image of {h}x{w} after resizing is smaller than crop_size={p.crop}")
        if p.crop_rounding == "floor":
            top, left = (h - p.crop) // 2, (w - p.crop) // 2
        else:
            top, left = int(round((h - p.crop) / 2.0)), int(round((w - p.crop) / 2.0))
        img = img.crop((left, top, left + p.crop, top + p.crop))
    return img


def _resize_pad(img: Image.Image, p: Preprocess) -> Image.Image:
    w, h = img.size
    scale = p.size / float(max(h, w))
    if scale == 1.0:
        return img
    new_h, new_w = round(h * scale), round(w * scale)
    img = img.resize((new_w, new_h), resample=p.resample)
    canvas = Image.new("RGB", (p.size, p.size), (0, 0, 0))
    canvas.paste(img, ((p.size - new_w) // 2, (p.size - new_h) // 2))
    return canvas


def preprocess_one(image: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [S, S, 3] (normalized, channels-last as our CLIP modules take it)."""
    img = Image.fromarray(np.asarray(image, np.uint8), mode="RGB")
    img = _resize_pad(img, p) if p.mode == "pad" else _resize_crop(img, p)
    x = np.asarray(img, np.float32) * np.float32(p.rescale_factor)
    if p.do_normalize:
        x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return x


def preprocess(images: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, S, S, 3], S = ``p.output_size``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"reward images must be uint8 [B, H, W, 3]; got {images.dtype} {images.shape}")
    return np.stack([preprocess_one(im, p) for im in images]) if len(images) else np.zeros(
        (0, p.output_size, p.output_size, 3), np.float32)
