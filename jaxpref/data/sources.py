"""Opening datasets by name: TFDS array_record datasets (shapes, pickapic_v2) and derived folders.

`open_source(name, split, data_dir)` returns a `Source`: a random-access data source (len, getitem) that
grain's DataLoader reads, plus what the loaders need to know (kind, reward range). Names:
- 'shapes' / 'shapes/pairs', 'shapes/base': the embedded world, built into data_dir on first use;
- 'pickapic_v2' or 'pickapic_v2/<config>': must have been built (python -m jaxpref.data.pickapic);
- a path to a derived folder: a latent cache (python -m jaxpref.data.cache) or DRO experts
  (python -m jaxpref.data.experts).
`scores=<folder>` joins rewards from python -m jaxpref.data.scores onto a pair source (reward_0/reward_1).
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from etils import epath

from jaxpref import paths
from jaxpref.data import common, records

_BUILD_HINT = {
    "pickapic_v2": "python -m jaxpref.data.pickapic --source=yuvalkirstain/pickapic_v2 (or a folder of its parquet "
                   "shards) --data_dir={}",
    "shapes": "jaxpref.data.prepare_shapes({!r}, kind=..., **settings)",
}


class Source:
    """A random-access data source plus its description.

    kind: 'pairs' (caption, jpg_0, jpg_1, label_0, reward_0, reward_1, ...), 'images' (caption, jpg, reward)
    or 'latents' (a latent cache; meta['layout'] says 'pairs' or 'images').
    reward_range: (min, max) of the scorer's rewards over the train split, for SmPO's normalisation, or None.
    """

    def __init__(self, data, *, name: str, split: str, kind: str, reward_range=None, meta: dict | None = None):
        self.data, self.name, self.split, self.kind = data, name, split, kind
        self.reward_range = None if reward_range is None else (float(reward_range[0]), float(reward_range[1]))
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[int(index)]

    def __getitems__(self, indices) -> list[dict]:
        if hasattr(self.data, "__getitems__"):
            return list(self.data.__getitems__(list(indices)))
        return [self.data[int(i)] for i in indices]

    def __repr__(self) -> str:
        return f"Source({self.name!r}, split={self.split!r}, kind={self.kind!r}, n={len(self)})"


class _Scored:
    """A pair source with reward_0 / reward_1 replaced by precomputed scores [N, 2]."""

    def __init__(self, data, scores: np.ndarray):
        self.data, self.scores = data, scores

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        rec = dict(self.data[index])
        rec["reward_0"], rec["reward_1"] = (np.float32(v) for v in self.scores[int(index)])
        return rec


def _data_dir(data_dir) -> pathlib.Path:
    """The TFDS data dir; a bucket (``gs://``) as an ``epath.Path`` (pathlib would read it as a folder ``gs:``)."""
    folder = os.path.expanduser(os.fspath(data_dir if data_dir is not None else paths.default_data_dir()))
    return epath.Path(folder) if "://" in folder else pathlib.Path(folder)


def _tfds_builder(name: str, data_dir: pathlib.Path):
    import tensorflow_datasets as tfds

    base, _, config = name.partition("/")
    if base == "shapes" and config in ("", "pairs", "base"):
        from jaxpref.world.builder import prepare_shapes

        return prepare_shapes(data_dir, config or "pairs")
    folder = data_dir / base / (config or "default")
    versions = sorted((p for p in folder.glob("*") if (p / "dataset_info.json").is_file()),
                      key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
    if not versions:
        built = sorted({f"{base}/{p.parent.parent.name}" for p in (data_dir / base).glob("*/*/dataset_info.json")})
        if built:   # a build with other settings: named first, so that the one line shows it
            raise ValueError(f"data_dir {data_dir} holds {', '.join(built)}, not {base}/{config or 'default'}: name "
                             f"the build to read (config.data.name={built[0]}), or build the default there with: "
                             f"{_BUILD_HINT[base].format(os.fspath(data_dir))}")
        raise ValueError(f"data_dir {data_dir}: expected a prepared {base}/{config or 'default'} dataset in "
                         f"{folder}/<version>/ (dataset_info.json and *.array_record-* files); "
                         f"build it with: {_BUILD_HINT[base].format(os.fspath(data_dir))}")
    return tfds.builder_from_directory(os.fspath(versions[-1]))


def _metadata(builder) -> dict:
    path = epath.Path(builder.data_dir) / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def open_source(name: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None,
                *, scores: str | os.PathLike | None = None) -> Source:
    """A `Source` for a dataset name (see module docstring) or a derived folder; split is ignored for folders."""
    if os.fspath(name).partition("/")[0] not in _BUILD_HINT:  # not a dataset name: a derived folder
        path = pathlib.Path(os.path.expanduser(os.fspath(name)))
        meta = records.read_meta(path)
        if meta["kind"] not in ("latents", "experts"):
            raise ValueError(f"{path}: a {meta['kind']!r} folder is not a data source; expected a latent cache or "
                             "experts folder (scores are joined with open_source(..., scores=folder))")
        kind = "latents" if meta["kind"] == "latents" else "images"
        rr = meta.get("reward_range")
        src = Source(records.RecordSource(path), name=os.fspath(path), split=meta.get("settings", {}).get("split", split),
                     kind=kind, reward_range=rr, meta=meta)
        if scores is not None:
            raise ValueError("open_source: scores= applies to pair datasets; pass scores= when building the cache")
        return src
    builder = _tfds_builder(os.fspath(name), _data_dir(data_dir))
    if split not in builder.info.splits:
        raise ValueError(f"{name}: no split {split!r} in {builder.data_dir}; it has {sorted(builder.info.splits)}")
    data = builder.as_data_source(split=split)
    kind = "pairs" if "jpg_0" in builder.info.features else "images"
    md = _metadata(builder)
    rr = (md["train_reward_min"], md["train_reward_max"]) if "train_reward_min" in md else None
    full = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
    meta = {"data_dir": os.fspath(builder.data_dir), "metadata": md, "num_examples": len(data)}
    if scores is not None:
        if kind != "pairs":
            raise ValueError(f"open_source: scores= needs a pair dataset, {name} has single images")
        smeta = records.read_meta(scores, "scores")
        expect = {"dataset": full, "split": split, "num_items": len(data)}
        got = {"dataset": smeta["settings"].get("dataset"), "split": smeta["settings"].get("split"),
               "num_items": smeta["num_items"]}
        if got != expect:
            raise ValueError(f"scores folder {scores} was computed for {got}, not for {expect}")
        data = _Scored(data, np.load(pathlib.Path(scores) / "scores.npy"))
        rr = (smeta["reward_min"], smeta["reward_max"])
        meta["scores"] = os.fspath(scores)
    return Source(data, name=full, split=split, kind=kind, reward_range=rr, meta=meta)


def load_prompts(name: str | os.PathLike = "shapes", split: str = "test_unique",
                 data_dir: str | os.PathLike | None = None) -> list[str]:
    """Unique captions of a split, in record order: held-out evaluation prompts (shapes: never in train)."""
    src = open_source(name, split, data_dir)
    seen = dict.fromkeys(common.as_str(src[i]["caption"]) for i in range(len(src)))
    return list(seen)
