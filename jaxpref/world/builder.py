"""TFDS builder `shapes`: the embedded shapes world as array_record files, laid out like pickapic_v2.

Configs:
- `shapes/pairs` (default): preference pairs of imperfect renders, winner first (label_0 = 1), reward-tied
  pairs dropped, soft rewards in reward_0 / reward_1. Splits: train (train captions), validation_unique and
  test_unique (one pair per held-out caption, like Pick-a-Pic's *_unique splits).
- `shapes/base`: single images (caption, jpg, reward) for training a base model, a mix of clean and
  flawed renders of every train caption. Split: train.

`prepare_shapes(data_dir)` builds once (seconds) and returns the builder; later calls reuse the files.
Non-default settings get their own config name (e.g. 'pairs_resolution64'), so caches never collide.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from jaxpref.data import common
from jaxpref.world import shapes

_DEFAULTS = {"pairs": dict(n_train_pairs=10000), "base": dict(per_caption=48)}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    kind: str = "pairs"  # 'pairs' or 'base'
    resolution: int = 32
    seed: int = 0  # render / flaw randomness
    holdout_seed: int = 0  # which captions are held out (shapes.caption_splits)
    n_validation: int = 16  # held-out captions in validation_unique
    n_test: int = 32  # held-out captions in test_unique
    n_train_pairs: int = 10000  # pair attempts on train captions (ties, ~5%, are dropped)
    tie_margin: float = 0.02  # |reward_0 - reward_1| <= margin counts as a tie
    p_clean: float = 0.15  # chance that one render of a pair has no flaw
    per_caption: int = 48  # base: images per train caption
    p_clean_base: float = 0.5  # base: share of clean renders
    image_format: str = "png"


def shapes_config(kind: str = "pairs", **overrides) -> ShapesConfig:
    """A config; its name is `kind` plus every non-default setting, so different settings never share a cache."""
    if kind not in _DEFAULTS:
        raise ValueError(f"shapes: kind must be one of {sorted(_DEFAULTS)}, got {kind!r}")
    fields = {f.name: f.default for f in dataclasses.fields(ShapesConfig)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"shapes_config: unknown settings {sorted(unknown)}")
    settings = {**_DEFAULTS[kind], **overrides}
    suffix = "_".join(f"{k}{v}" for k, v in sorted(settings.items())
                      if v != _DEFAULTS[kind].get(k, fields[k]))
    name = kind + ("_" + suffix.replace(".", "p") if suffix else "")
    return ShapesConfig(name=name, kind=kind, description=f"shapes world, {kind}", **settings)


class Shapes(tfds.core.GeneratorBasedBuilder):
    """The procedural shapes text-to-image world (see jaxpref.world.shapes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [shapes_config("pairs"), shapes_config("base")]
    DEFAULT_CONFIG_NAME = "pairs"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # tfds' own lookup needs the importlib_resources backport; this file is the answer
        return common.epath_of(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = common.pair_features() if cfg.kind == "pairs" else common.image_features()
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        caps = shapes.caption_splits(cfg.holdout_seed, cfg.n_validation, cfg.n_test)
        self.info.metadata.update({
            "train_captions": caps["train"], "validation_captions": caps["validation"],
            "test_captions": caps["test"], "resolution": cfg.resolution, "kind": cfg.kind,
            "reward": "jaxpref.world.shapes.reward_batch"})
        if cfg.kind == "base":
            return {"train": self._generate_base(caps["train"])}
        return {
            "train": self._generate_pairs("train", caps["train"], cfg.n_train_pairs, 0, False),
            "validation_unique": self._generate_pairs("validation_unique", caps["validation"], 0, 1, True),
            "test_unique": self._generate_pairs("test_unique", caps["test"], 0, 2, True),
        }

    def _generate_examples(self):  # required by tfds; the split generators above are used instead
        raise NotImplementedError

    def _generate_pairs(self, split, captions, n, split_key, unique):
        cfg = self.builder_config
        enc = lambda im: common.encode_image(im, cfg.image_format)  # noqa: E731
        kept, lo, hi = 0, np.inf, -np.inf
        for key, ex in shapes.generate_pairs(captions, n, cfg.seed, cfg.resolution, cfg.tie_margin, split_key,
                                             cfg.p_clean, one_per_caption=unique):
            r = ex["rewards"]
            kept += 1
            lo, hi = min(lo, float(r.min())), max(hi, float(r.max()))
            yield key, {
                "caption": ex["caption"], "jpg_0": enc(ex["images"][0]), "jpg_1": enc(ex["images"][1]),
                "label_0": 1.0, "label_1": 0.0, "reward_0": float(r[0]), "reward_1": float(r[1]),
                "image_0_uid": ex["uids"][0], "image_1_uid": ex["uids"][1], "swapped": int(ex["swapped"]),
                "source": f"shapes:{split}:{key}:flaws={ex['flaws'][0]}|{ex['flaws'][1]}",
            }
        attempts = len(captions) if unique else n
        self.info.metadata[f"{split}_pairs"] = kept
        self.info.metadata[f"{split}_ties_dropped"] = attempts - kept
        self.info.metadata[f"{split}_reward_min"] = lo
        self.info.metadata[f"{split}_reward_max"] = hi
        common.log.info("shapes/%s[%s]: kept %d pairs, dropped %d ties", cfg.name, split, kept, attempts - kept)

    def _generate_base(self, captions):
        cfg = self.builder_config
        batch = []

        def flush():
            imgs = np.stack([ex["image"] for _, ex in batch])
            r = shapes.reward_batch(imgs, [ex["caption"] for _, ex in batch])
            for (key, ex), ri in zip(batch, r):
                yield key, {"caption": ex["caption"], "jpg": common.encode_image(ex["image"], cfg.image_format),
                            "reward": float(ri), "uid": ex["uid"], "source": f"shapes:base:{key}:flaws={ex['flaws']}"}
            batch.clear()

        for key, ex in shapes.generate_base(captions, cfg.per_caption, cfg.seed, cfg.resolution, cfg.p_clean_base):
            batch.append((key, ex))
            if len(batch) == 256:
                yield from flush()
        yield from flush()


def prepare_shapes(data_dir: str | os.PathLike, kind: str = "pairs", **overrides) -> Shapes:
    """The shapes builder for `kind` ('pairs' or 'base'), built into data_dir on first use (cached after).

    A local data_dir is built under a file lock: runs started together on a fresh data dir build it once (the
    others wait and read it) instead of failing on TFDS's final rename. (A bucket path, gs://..., is built by
    whichever run gets there first, as TFDS does.)"""
    cfg = shapes_config(kind, **overrides)
    builder = _builder(cfg, data_dir)
    if builder.is_prepared():
        return builder
    with _build_lock(os.fspath(data_dir), cfg.name):
        builder = _builder(cfg, data_dir)  # another run may have built it while this one waited
        if not builder.is_prepared():
            # TFDS prints "Downloading and preparing dataset ..." to stdout; nothing is downloaded: say what happens.
            print(f"building the shapes/{kind} dataset into {os.fspath(data_dir)} (first use only) ...", flush=True)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            print(f"built the shapes/{kind} dataset in {time.perf_counter() - start:.1f}s", flush=True)
    return builder


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".shapes_{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _builder(cfg: ShapesConfig, data_dir) -> Shapes:
    known = {c.name for c in Shapes.BUILDER_CONFIGS}
    return Shapes(config=cfg.name if cfg.name in known else cfg, data_dir=os.fspath(data_dir), file_format="array_record")
