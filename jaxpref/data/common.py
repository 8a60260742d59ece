"""Pieces shared by the dataset builders and loaders: feature layouts, image codecs, build reports.

Images are stored as encoded bytes (JPEG for Pick-a-Pic, PNG for shapes) in a plain `Tensor(object)`
feature: TFDS's `Image` feature needs TensorFlow, which we do not depend on.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image

log = logging.getLogger("jaxpref.data")


def pair_features():
    """Feature layout of a preference pair (pickapic_v2 and shapes/pairs). Winner first unless configured off."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict({
        "caption": f.Text(),
        "jpg_0": f.Tensor(shape=(), dtype=np.object_),  # encoded image bytes
        "jpg_1": f.Tensor(shape=(), dtype=np.object_),
        "label_0": f.Scalar(dtype=np.float32),  # human (Pick-a-Pic) or reward (shapes) preference for image 0
        "label_1": f.Scalar(dtype=np.float32),
        "reward_0": f.Scalar(dtype=np.float32),  # scorer reward; NaN when the builder has none (pickapic_v2)
        "reward_1": f.Scalar(dtype=np.float32),
        "image_0_uid": f.Text(),
        "image_1_uid": f.Text(),
        "swapped": f.Scalar(dtype=np.int32),  # 1 if the builder swapped the source's image order
        "source": f.Text(),  # provenance: 'file.parquet:row' or 'shapes:split:attempt'
    })


def image_features():
    """Feature layout of single captioned images (shapes/base, DRO experts)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict({
        "caption": f.Text(),
        "jpg": f.Tensor(shape=(), dtype=np.object_),
        "reward": f.Scalar(dtype=np.float32),
        "uid": f.Text(),
        "source": f.Text(),
    })


def epath_of(path: str):
    from etils import epath

    return epath.Path(path)


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> PNG or JPEG bytes."""
    buf = io.BytesIO()
    im = Image.fromarray(np.asarray(image, np.uint8))
    if fmt.lower() in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, resolution: int | None = None, center_crop: bool = True) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] RGB; with `resolution`, shorter side resized (bilinear) then cropped.

    center_crop=False leaves the resized (possibly non-square) image. Raises on corrupt data.
    """
    return decode_image_with_time_ids(data, resolution, center_crop)[0]


def decode_image_with_time_ids(data: bytes, resolution: int | None = None,
                               center_crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``decode_image`` plus SDXL's size conditioning of the result: float32 [6] = (original h, w before the
    resize, crop top, crop left in the resized image, target h, w), diffusers' convention. Without
    center_crop the crop is (0, 0) and the target (resolution, resolution): a random crop sets it later
    (``with_crop``)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w0, h0 = im.size
        top = left = 0
        if resolution is not None:
            im = resize_shorter(im, resolution)
            if center_crop:
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
        target = (resolution, resolution) if resolution is not None else (h0, w0)
        return np.asarray(im, np.uint8), np.asarray((h0, w0, top, left, *target), np.float32)


def with_crop(time_ids: np.ndarray, top: int, left: int) -> np.ndarray:
    """time_ids [..., 6] with the crop top-left replaced."""
    out = np.array(time_ids, np.float32, copy=True)
    out[..., 2], out[..., 3] = top, left
    return out


def flipped_time_ids(time_ids: np.ndarray) -> np.ndarray:
    """time_ids [..., 6] of the horizontally flipped crop: its left edge in the flipped resized image is
    W - target w - left (as diffusers' SDXL script, which flips before it crops, records it)."""
    time_ids = np.asarray(time_ids, np.float32)
    h0, w0, target_h, target_w = time_ids[..., 0], time_ids[..., 1], time_ids[..., 4], time_ids[..., 5]
    resized_w = np.where(w0 <= h0, target_w, np.maximum(target_w, np.round(w0 * target_w / h0)))  # resize_shorter
    resized_w = np.where((target_h == h0) & (target_w == w0), w0, resized_w)  # stored size: no resize, no crop
    return with_crop(time_ids, time_ids[..., 2], resized_w - target_w - time_ids[..., 3])


def resize_shorter(im, resolution: int):
    """PIL image with its shorter side resized to `resolution` (torchvision Resize(int), bilinear, antialiased)."""
    w, h = im.size
    if min(w, h) == resolution:
        return im
    if w <= h:
        size = (resolution, max(resolution, int(round(h * resolution / w))))
    else:
        size = (max(resolution, int(round(w * resolution / h))), resolution)
    return im.resize(size, Image.BILINEAR)


def as_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.shape == ():
        return as_str(x.item())
    return str(x)


@dataclasses.dataclass
class BuildReport:
    """What a build kept and skipped. Skips are (file, row, reason); row is None when a whole file is skipped."""

    name: str
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # intended drops (ties)
    skipped: list = dataclasses.field(default_factory=list)

    def skip(self, file: str, row: int | None, reason: str) -> None:
        self.skipped.append((os.path.basename(str(file)), row, reason))
        log.warning("%s: skipped %s%s: %s", self.name, os.path.basename(str(file)),
                    "" if row is None else f" row {row}", reason)

    @property
    def skip_counts(self) -> dict[str, int]:
        kinds = collections.Counter(r.split(":")[0] for _, _, r in self.skipped)
        return dict(sorted(kinds.items()))

    def summary(self) -> str:
        rows = [s for s in self.skipped if s[1] is not None]
        files = [s for s in self.skipped if s[1] is None]
        drops = ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items())) or "nothing"
        kinds = ", ".join(f"{k}: {n}" for k, n in self.skip_counts.items()) or "none"
        return (f"{self.name}: kept {self.kept}; dropped {drops}; skipped {len(rows)} rows and {len(files)} files "
                f"({kinds})")

    def to_json(self) -> dict:
        return {"name": self.name, "kept": self.kept, "dropped": dict(self.dropped),
                "skip_counts": self.skip_counts,
                "skipped": [{"file": f, "row": r, "reason": why} for f, r, why in self.skipped],
                "summary": self.summary()}

    def write(self, path: str | os.PathLike) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")
