"""The one interface every reward model has: ``scorer(images uint8 [B, H, W, 3], prompts) -> float32 [B]``.

The data engineer's reward-score builder (``jaxpref.data.scores``) and DRO's expert selection call
``score_fn(images, captions)`` with exactly this signature, so any ``Scorer`` plugs in there.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

BatchFn = Callable[[np.ndarray, list], np.ndarray]


def as_prompts(prompts: Sequence) -> list[str]:
    """Captions as str (TFDS and parquet hand out bytes)."""
    return [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in prompts]


def check_batch(images, prompts: Sequence) -> tuple[np.ndarray, list[str]]:
    """Validates a scorer's inputs: uint8 [B, H, W, 3] and B prompts."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"scorer: images must be uint8 [B, H, W, 3]; got {images.dtype} {images.shape}")
    prompts = as_prompts(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"scorer: {len(images)} images but {len(prompts)} prompts")
    return images, prompts


class Scorer:
    """A reward model behind a fixed signature, run in chunks of ``batch_size``.

    ``fn(images uint8 [b, H, W, 3], prompts list[str]) -> [b]`` scores one chunk. With ``pad_batches``
    the last chunk is padded (by repeating its first item) to ``batch_size`` so a jitted model compiles
    once per image size, not once per remainder.
    """

    def __init__(self, name: str, fn: BatchFn, *, batch_size: int = 32, pad_batches: bool = True,
                 description: str = ""):
        if batch_size < 1:
            raise ValueError(f"scorer {name}: batch_size={batch_size}; expected >= 1")
        self.name, self.fn, self.batch_size, self.pad_batches = name, fn, batch_size, pad_batches
        self.description = description

    def __repr__(self) -> str:
        return f"Scorer({self.name!r}, batch_size={self.batch_size})"

    def __call__(self, images, prompts: Sequence) -> np.ndarray:
        """images uint8 [B, H, W, 3], prompts: B strings -> float32 [B]."""
        images, prompts = check_batch(images, prompts)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk, texts = images[start:start + self.batch_size], prompts[start:start + self.batch_size]
            n = len(chunk)
            if self.pad_batches and n < self.batch_size:
                fill = self.batch_size - n
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], fill, axis=0)])
                texts = texts + texts[:1] * fill
            scores = np.asarray(self.fn(chunk, texts), np.float32).reshape(-1)
            out.append(scores[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
