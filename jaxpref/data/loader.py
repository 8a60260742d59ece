"""Deterministic, checkpointable, per-host-sharded batch iterators over a `Source` (grain DataLoader).

    src = open_source("shapes", "train", data_dir)            # or "pickapic_v2", or a latent-cache folder
    it = make_loader(src, global_batch_size=64, seed=0, sharding=NamedSharding(mesh, P("data")))
    batch = next(it)                                           # dict of global jax.Arrays
    state = it.get_state()                                     # bytes: save with the training checkpoint
    it.set_state(state)                                        # ... and restore: continues with the next batch

Batches (B = global batch size; leading axis sharded; winner first for pairs):
- pairs:   images uint8 [B, 2, H, W, 3], input_ids int32 [B, L], label float32 [B] (preference of image 0),
           rewards float32 [B, 2] (NaN when the source has none), rewards_norm [B, 2] when the source has a
           reward range ((r - min) / (max - min), SmPO), index int64 [B] (source record).
- images:  images uint8 [B, H, W, 3], input_ids, reward float32 [B], index.
- latents: latent_mean, latent_std [B, 2, h, w, c] (pairs) or [B, h, w, c] (images) in the cache dtype (VAE
           posterior, unscaled: multiply samples by the VAE scaling factor yourself), input_ids, and the
           label / rewards / reward fields as above.
- with ``time_ids=True`` (SDXL): time_ids float32 [B, 2, 6] (pairs) or [B, 6]: per image (original h, w,
           crop top, left, target h, w) of the crop it was cut with (center, or the random crop, or the
           cache's center crop; mirrored with the flip), what the UNet's size conditioning reads.

Each host reads a contiguous 1/process_count of the records (grain ShardOptions, drop_remainder), shuffles
it with `seed` (a new order each epoch) and draws augmentations (a horizontal flip shared by both images
of a pair, caption dropout, random crop) from per-record generators keyed on (seed, position), so a
restored iterator replays exactly. Images are decoded in grain's read threads (PIL releases the GIL).
"""
from __future__ import annotations

import functools
import os
import threading

import grain.python as grain
import numpy as np
from absl import flags

from jaxpref.data import common
from jaxpref.data.sources import Source
from jaxpref.data.tokenizer import load_tokenizer, tokenize
from jaxpref.sharding import put_global_batch


_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=65536)
def _ids(tokenizer_path: str | None, caption: str, max_length: int | None) -> np.ndarray:
    with _TOKENIZER_LOCK:  # read threads of a fresh worker would race on transformers' lazy imports
        tok = load_tokenizer(tokenizer_path)
    return tokenize(tok, [caption], max_length)[0]


def _finite_rewards(source: Source, n: int = 8) -> bool:
    idx = np.unique(np.linspace(0, len(source) - 1, num=min(n, len(source))).astype(int))
    for i in idx:
        rec = source[int(i)]
        vals = [rec[k] for k in ("reward_0", "reward_1", "reward") if k in rec]
        if not vals or not np.all(np.isfinite(np.asarray(vals, np.float64))):
            return False
    return True


class _Prepared:
    """Source wrapper run in grain's read threads: decode, resize, tokenize; everything deterministic."""

    def __init__(self, source: Source, resolution, crop, tokenizer, max_length, keep_captions, time_ids=False):
        self.source, self.resolution, self.crop, self.time_ids = source, resolution, crop, time_ids
        self.tokenizer, self.max_length, self.keep_captions = tokenizer, max_length, keep_captions
        lo_hi = source.reward_range
        self.lo, self.span = (lo_hi[0], max(lo_hi[1] - lo_hi[0], 1e-12)) if lo_hi else (None, None)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:  # grain checks it on set_state: a state only restores onto the same data
        return f"_Prepared({self.source!r})"

    def _img(self, data: bytes):
        """uint8 [H, W, 3], or with time_ids (image, time_ids [6])."""
        if self.time_ids:
            return common.decode_image_with_time_ids(data, self.resolution, self.crop == "center")
        return common.decode_image(data, self.resolution, self.crop == "center")

    def _images(self, out: dict, *encoded) -> None:
        decoded = [self._img(e) for e in encoded]
        stack = np.stack if len(decoded) > 1 else (lambda xs: xs[0])
        if self.time_ids:
            out["images"], out["time_ids"] = stack([d[0] for d in decoded]), stack([d[1] for d in decoded])
        else:
            out["images"] = stack(decoded)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rec = self.source[index]
        kind = self.source.kind
        out = {"index": np.int64(index)}
        caption = common.as_str(rec.get("caption", ""))
        if kind == "latents":
            out["input_ids"] = np.asarray(rec["input_ids"], np.int32)
            for k in ("latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip"):
                if k in rec:
                    out[k] = rec[k]
            if self.time_ids:
                if "time_ids" not in rec:
                    raise ValueError(f"{self.source}: this latent cache has no time_ids (SDXL's crop conditioning); "
                                     "rebuild it with python -m jaxpref.data.cache, which records them")
                out["time_ids"] = np.asarray(rec["time_ids"], np.float32)
                if "time_ids_flip" in rec:
                    out["time_ids_flip"] = np.asarray(rec["time_ids_flip"], np.float32)
            layout = self.source.meta.get("layout", "pairs")
        else:
            out["input_ids"] = _ids(self.tokenizer, caption, self.max_length)
            layout = kind
            if kind == "pairs":
                self._images(out, rec["jpg_0"], rec["jpg_1"])
            else:
                self._images(out, rec["jpg"])
        if layout == "pairs":
            out["label"] = np.float32(rec.get("label_0", 1.0))
            out["label_1"] = np.float32(rec.get("label_1", 1.0 - out["label"]))
            out["rewards"] = np.asarray([rec.get("reward_0", np.nan), rec.get("reward_1", np.nan)], np.float32)
        else:
            out["reward"] = np.float32(rec.get("reward", np.nan))
        if self.keep_captions:
            out["caption"] = np.asarray(caption)
        return out


def _swap(x: np.ndarray) -> np.ndarray:
    return x[::-1].copy()


class _Augment(grain.RandomMapTransform):
    """grain RandomMapTransform: pair ordering, shared flip, random crop, reward normalisation.

    Caption dropout is not here: the train step draws it per pair (``jaxpref.methods.base.drop_captions``).
    """

    def __init__(self, *, order, random_flip, resolution, crop, lo, span):
        self.order, self.random_flip = order, random_flip
        self.resolution, self.crop, self.lo, self.span = resolution, crop, lo, span

    def random_map(self, el: dict, rng: np.random.Generator) -> dict:
        u = rng.random(4)  # fixed draw count: flip, (unused), crop y, crop x
        el = dict(el)
        if "rewards" in el:
            swap = False
            if self.order == "label":
                swap = el["label"] < el.pop("label_1")
            else:
                el.pop("label_1")
                if self.order == "reward":
                    swap = el["rewards"][1] > el["rewards"][0]
            if swap:
                for k in ("images", "latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip", "rewards",
                          "time_ids", "time_ids_flip"):
                    if k in el:
                        el[k] = _swap(el[k])
                el["label"] = np.float32(1.0 - el["label"])
            if self.lo is not None:
                el["rewards_norm"] = ((el["rewards"] - self.lo) / self.span).astype(np.float32)
        if "images" in el and self.crop == "random" and self.resolution is not None:
            im = el["images"]
            h, w = im.shape[-3:-1]
            top, left = int(u[2] * (h - self.resolution + 1)), int(u[3] * (w - self.resolution + 1))
            el["images"] = np.ascontiguousarray(im[..., top:top + self.resolution, left:left + self.resolution, :])
            if "time_ids" in el:
                el["time_ids"] = common.with_crop(el["time_ids"], top, left)
        flip = self.random_flip and u[0] < 0.5
        if "images" in el and flip:  # one flip for both images of a pair (W is axis -2)
            el["images"] = np.ascontiguousarray(el["images"][..., ::-1, :])
            if "time_ids" in el:
                el["time_ids"] = common.flipped_time_ids(el["time_ids"])
        if "latent_mean" in el:
            if flip and "latent_mean_flip" in el:
                el["latent_mean"], el["latent_std"] = el["latent_mean_flip"], el["latent_std_flip"]
                if "time_ids_flip" in el:
                    el["time_ids"] = el["time_ids_flip"]
            for k in ("latent_mean_flip", "latent_std_flip", "time_ids_flip"):
                el.pop(k, None)
        return el


class Loader:
    """An endless (or num_epochs-long) iterator of batches with checkpointable state."""

    def __init__(self, data_loader, *, sharding=None, per_host_batch: int, process_index: int, process_count: int):
        self.data_loader, self.sharding = data_loader, sharding
        self.per_host_batch, self.process_index, self.process_count = per_host_batch, process_index, process_count
        self._it = iter(data_loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        return batch if self.sharding is None else put_global_batch(self.sharding, batch)

    def get_state(self) -> bytes:
        """Opaque bytes (grain's JSON iterator state) to store in the training checkpoint."""
        return self._it.get_state()

    def set_state(self, state: bytes) -> None:
        """Resume: the next batch is the one that followed when `state` was taken."""
        self._it.set_state(state)


def make_loader(source: Source, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                tokenizer: str | os.PathLike | None = None, max_length: int | None = None,
                resolution: int | None = None, crop: str = "center", random_flip: bool = True,
                order: str = "label", require_rewards: bool = False,
                keep_captions: bool = False, time_ids: bool = False, sharding=None, process_index: int | None = None,
                process_count: int | None = None, worker_count: int = 0, read_threads: int = 4) -> Loader:
    """Batches from `source` (see module docstring for layouts).

    global_batch_size: rows per step over all hosts; each host yields global_batch_size / process_count.
    tokenizer: CLIP tokenizer folder (default: the shapes tokenizer); ignored for latent caches (ids cached).
    resolution: resize the shorter side to this, then crop ('center' or 'random'); None keeps stored size.
    order: 'label' (winner first by label_0, DPO), 'reward' (higher reward first, SmPO) or 'none'.
    require_rewards: fail fast if the source has no finite rewards (run python -m jaxpref.data.scores).
    time_ids: also yield each image's SDXL size conditioning (module docstring).
    sharding: a NamedSharding for the batch axis; with it batches are global jax.Arrays, without numpy.
    process_index / process_count: default jax.process_index() / jax.process_count() (override in tests).
    worker_count: grain worker processes (0: decode in this process's read threads). Batches do not depend
      on it, but a saved state restores only into a loader with the same worker_count (grain's rule).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    if order not in ("label", "reward", "none"):
        raise ValueError(f"order must be 'label', 'reward' or 'none', got {order!r}")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if require_rewards and not _finite_rewards(source):
        raise ValueError(f"{source}: no rewards (reward_0/reward_1 are NaN); score the pairs with python -m "
                         "jaxpref.data.scores and open the source with open_source(..., scores=<folder>)")
    per_host = global_batch_size // process_count
    if len(source) // process_count < per_host and drop_remainder:
        raise ValueError(f"{source}: {len(source)} records over {process_count} hosts cannot fill a batch of {per_host}")
    if worker_count:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
    tok = None if tokenizer is None else os.fspath(tokenizer)
    lo_hi = source.reward_range
    prepared = _Prepared(source, resolution, crop, tok, max_length, keep_captions, time_ids)
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=shuffle,
                                 num_epochs=num_epochs, seed=int(seed))
    augment = _Augment(order=order, random_flip=random_flip, resolution=resolution, crop=crop, lo=None if lo_hi is None else lo_hi[0],
                       span=None if lo_hi is None else max(lo_hi[1] - lo_hi[0], 1e-12))
    ops = [augment, grain.Batch(per_host, drop_remainder=drop_remainder)]
    dl = grain.DataLoader(data_source=prepared, sampler=sampler, operations=ops, worker_count=worker_count,
                          shard_options=shard, read_options=grain.ReadOptions(num_threads=read_threads,
                                                                              prefetch_buffer_size=4 * per_host))
    return Loader(dl, sharding=sharding, per_host_batch=per_host, process_index=process_index,
                  process_count=process_count)
