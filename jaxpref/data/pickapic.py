"""TFDS builder `pickapic_v2`: Pick-a-Pic v2 preference pairs from its parquet shards, fetched from the
Hugging Face hub or read from a local folder.

    python -m jaxpref.data.pickapic --source=yuvalkirstain/pickapic_v2 --data_dir=/data/tfds
    python -m jaxpref.data.pickapic --source=yuvalkirstain/pickapic_v2 --max_shards=4   # a slice
    python -m jaxpref.data.pickapic --source=/data/pickapic_v2_parquet --data_dir=/data/tfds

`--source` is a hub dataset id (`org/name[@revision]`): the shards of the asked splits are fetched into the
Hugging Face cache first (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE honoured; their count and size are printed
before the download starts; an interrupted download resumes when rerun; the whole train split is 645
shards, ~335 GB), or a local folder of the shards. `--max_shards=N` builds from the first N shards of each
split; a data_dir keeps one build per config, so a full build after a slice needs another `--data_dir`.
`--data_dir` defaults to the training config's default (`$JAXPREF_DATA_DIR`, else
`$XDG_CACHE_HOME/jaxpref/tfds`).

The default build, dataset ``pickapic_v2``, holds train, validation_unique and test_unique: what training
reads and what a real model's run evaluates on (test_unique's captions). A build with other settings
(``--split``, ``--resolution``, ...) is its own dataset, named after them (``pickapic_v2/splitstrain``):
a run reads it with ``--config.data.name=pickapic_v2/splitstrain``.

Split names come from file names (`train-00000-of-00645-*.parquet`, `validation_unique-*`, `test_unique-*`),
searched recursively. Each row becomes one example with the layout of `common.pair_features()`; images are
stored as JPEG bytes (re-encoded at `resolution`, or the original bytes when resolution is None). Rows with
a corrupt image, an empty caption or a missing label, and files that cannot be opened or lack a required
column, are skipped and listed in build_report_<split>.json next to the data; a build always ends with a
summary line per split. Ties (label_0 = 0.5) are dropped by default and pairs are ordered winner first.

TFDS builds are atomic (written to a temporary folder, renamed at the end), not resumable: an interrupted
build starts over. The derived datasets (latent cache, scores, experts) are resumable.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Iterable, Optional

import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from jaxpref import hub, paths
from jaxpref.data import common

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
OPTIONAL_COLUMNS = ("label_1", "image_0_uid", "image_1_uid", "best_image_uid")
KNOWN_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
_SPLIT_RE = re.compile(r"^(?P<split>[a-z_]+?)-\d{5}-of-\d{5}.*\.parquet$")


@dataclasses.dataclass(eq=False)
class PickapicConfig(tfds.core.BuilderConfig):
    drop_ties: bool = True  # label_0 == 0.5 pairs dropped (Diffusion-DPO)
    winner_first: bool = True  # swap so that image 0 is the preferred one (label_0 = 1)
    resolution: int | None = 512  # shorter side resized to this; None keeps the original JPEG bytes
    center_crop: bool = True  # with resolution: square center crop
    jpeg_quality: int = 95
    allow_empty_caption: bool = False
    splits: tuple = ("train", "validation_unique", "test_unique")
    rows_per_batch: int = 32  # parquet rows read (and images decoded in parallel) at a time


_DEFAULT = dict(drop_ties=True, winner_first=True, resolution=512, center_crop=True, jpeg_quality=95,
                allow_empty_caption=False, splits=("train", "validation_unique", "test_unique"))


def pickapic_config(**overrides) -> PickapicConfig:
    """Config 'default' (the settings above) or one named after its non-default settings."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(PickapicConfig)}
    if unknown:
        raise ValueError(f"pickapic_config: unknown settings {sorted(unknown)}")
    if "splits" in overrides:
        overrides["splits"] = tuple(overrides["splits"])
        bad = set(overrides["splits"]) - set(KNOWN_SPLITS)
        if bad:
            raise ValueError(f"pickapic_config: unknown splits {sorted(bad)}; known: {KNOWN_SPLITS}")
    diff = {k: v for k, v in sorted(overrides.items()) if k in _DEFAULT and v != _DEFAULT[k]}
    name = "default" if not diff else "_".join(
        f"{k}{'-'.join(v) if isinstance(v, tuple) else v}" for k, v in diff.items())
    return PickapicConfig(name=name, description="Pick-a-Pic v2 pairs", **overrides)


def find_parquet_files(parquet_dir: str | os.PathLike) -> dict[str, list[pathlib.Path]]:
    """{split: sorted parquet files} under parquet_dir; ValueError saying what was expected when none."""
    root = pathlib.Path(parquet_dir)
    if not root.is_dir():
        raise ValueError(f"pickapic_v2: parquet_dir {root} is not a folder; expected the Pick-a-Pic v2 parquet "
                         "shards (train-00000-of-00645-*.parquet, validation_unique-*, test_unique-*)")
    found: dict[str, list[pathlib.Path]] = {}
    for p in sorted(root.rglob("*.parquet")):
        m = _SPLIT_RE.match(p.name)
        if m and m["split"] in KNOWN_SPLITS:
            found.setdefault(m["split"], []).append(p)
    if not found:
        raise ValueError(f"pickapic_v2: no parquet shards under {root}; expected files named like "
                         "train-00000-of-00645-<hash>.parquet, validation_unique-00000-of-00001-<hash>.parquet, "
                         "test_unique-00000-of-00001-<hash>.parquet")
    return found


def shards_by_split(files: Iterable, splits: Iterable[str], max_shards: Optional[int] = None) -> dict[str, list]:
    """{split: its shard paths in order, the first ``max_shards`` only} of ``files`` (paths, local or a hub
    repository's) whose names are Pick-a-Pic shards of one of ``splits``."""
    found: dict[str, list] = {}
    for f in sorted(files, key=lambda f: (os.path.basename(os.fspath(f)), os.fspath(f))):
        m = _SPLIT_RE.match(os.path.basename(os.fspath(f)))
        if m and m["split"] in splits:
            found.setdefault(m["split"], []).append(f)
    return {s: v[:max_shards] if max_shards else v for s, v in found.items()}


def shards_from_source(source, splits: Iterable[str], max_shards: Optional[int] = None,
                       announce=print) -> dict[str, list[pathlib.Path]]:
    """{split: local parquet shards} of ``source``: a local folder (searched recursively) or a hub dataset
    repository ``org/name[@revision][/subfolder]``, whose shards of ``splits`` (the first ``max_shards`` of each)
    are fetched into the Hugging Face cache first, their count and size stated before the download starts."""
    splits = tuple(splits)
    text = os.fspath(source)
    if not os.path.exists(os.path.expanduser(text)) and not hub.is_hub_id(text):
        raise ValueError(f"pickapic_v2: source {text} is not a folder of Pick-a-Pic v2 parquet shards nor a hub "
                         "dataset id (org/name[@revision], e.g. yuvalkirstain/pickapic_v2)")
    if os.path.exists(os.path.expanduser(text)):
        found = find_parquet_files(os.path.expanduser(text))    # the folder's own error when it holds none
        return shards_by_split([p for files in found.values() for p in files], splits, max_shards)
    ref = hub.parse_hub_id(text)
    listing = hub.list_files(ref, repo_type="dataset", key="--source", value=text)
    prefix = ref.subfolder + "/" if ref.subfolder else ""
    in_repo = [p for p in listing.files if p.startswith(prefix)]
    available = shards_by_split(in_repo, KNOWN_SPLITS)
    chosen = shards_by_split(in_repo, splits, max_shards)
    if not chosen:
        raise ValueError(f"--source={text!r}: the dataset repository has no parquet shards of the splits {splits} "
                         f"(it has {sorted(available) or 'none'}; known splits: {KNOWN_SPLITS})")
    sizes = {s: [listing.files[p] for p in files] for s, files in chosen.items()}
    total = lambda values: None if any(v is None for v in values) else sum(values)  # noqa: E731
    parts = [f"{s} {len(files)} of {len(available[s])} shards ({hub.human_size(total(sizes[s]))})"
             for s, files in chosen.items()]
    announce(f"pickapic_v2 from {ref}: {', '.join(parts)}; {hub.human_size(total(sum(sizes.values(), [])))} in all")
    folder = hub.fetch(listing, [p for files in chosen.values() for p in files], key="--source", value=text,
                       announce=announce)
    return {s: [pathlib.Path(folder, p) for p in files] for s, files in chosen.items()}


def _image_bytes(value):
    if isinstance(value, dict):  # HF `Image` feature stored as struct {bytes, path}
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray, memoryview)) and len(value) else None


class PickapicV2(tfds.core.GeneratorBasedBuilder):
    """Pick-a-Pic v2 preference pairs (Kirstain et al., 2023) from local parquet files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [pickapic_config()]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the Pick-a-Pic v2 parquet files (train-*-of-00645-*.parquet, "
                                    "validation_unique-*.parquet, test_unique-*.parquet) in manual_dir.")
    shard_files: Optional[dict] = None   # {split: parquet paths} chosen by build_pickapic (else manual_dir's all)
    max_shards: Optional[int] = None     # recorded in the metadata: a slice is never taken for the full build

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # tfds' own lookup needs the importlib_resources backport
        return common.epath_of(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=common.pair_features(),
                                     homepage="https://huggingface.co/datasets/yuvalkirstain/pickapic_v2",
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        files = self.shard_files if self.shard_files is not None else find_parquet_files(dl_manager.manual_dir)
        wanted = [s for s in self.builder_config.splits if s in files]
        if not wanted:
            raise ValueError(f"pickapic_v2: {dl_manager.manual_dir} has splits {sorted(files)}, none of the "
                             f"configured {self.builder_config.splits}")
        self.reports = {}
        return {s: self._generate_split(s, files[s]) for s in wanted}

    def _generate_examples(self):  # tfds requires it; _generate_split is used per split
        raise NotImplementedError

    def _generate_split(self, split: str, files: list[pathlib.Path]):
        cfg = self.builder_config
        report = common.BuildReport(f"pickapic_v2/{cfg.name}[{split}]")
        self.reports[split] = report
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for path in files:
                try:
                    pf = pq.ParquetFile(path)
                    names = set(pf.schema_arrow.names)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                    report.skip(path, None, f"unreadable parquet: {type(e).__name__}: {e}")
                    continue
                missing = [c for c in REQUIRED_COLUMNS if c not in names]
                if missing:
                    report.skip(path, None, f"missing column: {', '.join(missing)}")
                    continue
                cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
                row = 0
                try:
                    for batch in pf.iter_batches(batch_size=cfg.rows_per_batch, columns=cols):
                        rows = batch.to_pylist()
                        for offset, out in enumerate(pool.map(self._process_row, rows)):
                            kind, value = out
                            if kind == "example":
                                report.kept += 1
                                value["source"] = f"{path.name}:{row + offset}"
                                yield f"{path.name}:{row + offset}", value
                            elif kind == "drop":
                                report.dropped[value] += 1
                            else:
                                report.skip(path, row + offset, value)
                        row += len(rows)
                except Exception as e:  # noqa: BLE001 - a broken row group ends this file, not the build
                    report.skip(path, None, f"unreadable parquet: read failed after row {row}: {type(e).__name__}: {e}")
        self.info.metadata[f"{split}_report"] = {k: v for k, v in report.to_json().items() if k != "skipped"}
        self.info.metadata[f"{split}_shards"] = len(files)
        self.info.metadata["max_shards"] = self.max_shards
        report.write(pathlib.Path(self.data_dir) / f"build_report_{split}.json")
        print(report.summary(), flush=True)

    def _process_row(self, r: dict):
        """('example', dict) | ('drop', why) | ('skip', reason) for one parquet row."""
        cfg = self.builder_config
        caption = r.get("caption")
        if caption is None or (not str(caption).strip() and not cfg.allow_empty_caption):
            return "skip", "empty caption"
        label_0 = r.get("label_0")
        if label_0 is None or not math.isfinite(float(label_0)) or not 0.0 <= float(label_0) <= 1.0:
            return "skip", f"bad label: label_0={label_0!r}"
        label_0 = float(label_0)
        label_1 = r.get("label_1")
        label_1 = 1.0 - label_0 if label_1 is None or not math.isfinite(float(label_1)) else float(label_1)
        if cfg.drop_ties and label_0 == label_1:
            return "drop", "ties"
        images = []
        for col in ("jpg_0", "jpg_1"):
            data = _image_bytes(r.get(col))
            if data is None:
                return "skip", f"missing image: {col}"
            try:
                if cfg.resolution is None:
                    common.decode_image(bytes(data))  # full decode: catches truncated files
                    images.append(bytes(data))
                else:
                    arr = common.decode_image(bytes(data), cfg.resolution, cfg.center_crop)
                    images.append(common.encode_image(arr, "jpeg", cfg.jpeg_quality))
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
                return "skip", f"corrupt image: {col}: {type(e).__name__}: {e}"
        uids = [str(r.get("image_0_uid") or ""), str(r.get("image_1_uid") or "")]
        labels = [label_0, label_1]
        swapped = cfg.winner_first and label_0 < label_1
        if swapped:
            images, uids, labels = images[::-1], uids[::-1], labels[::-1]
        return "example", {
            "caption": str(caption), "jpg_0": images[0], "jpg_1": images[1],
            "label_0": labels[0], "label_1": labels[1], "reward_0": float("nan"), "reward_1": float("nan"),
            "image_0_uid": uids[0], "image_1_uid": uids[1], "swapped": int(swapped)}


def build_pickapic(source: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                   max_shards: Optional[int] = None, announce=print, **config) -> PickapicV2:
    """Build pickapic_v2 (config from `pickapic_config(**config)`) into data_dir (None: the default data dir)
    from ``source``, a local folder of parquet shards or a hub dataset id (``shards_from_source``); no-op if
    already built (from the same ``max_shards``).

    Returns the builder; `builder.reports[split]` holds the BuildReport of a build made by this call.
    """
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"pickapic_v2: max_shards={max_shards}; a number of shards >= 1, or None for all")
    cfg = pickapic_config(**config)
    data_dir = os.fspath(data_dir) if data_dir is not None else paths.default_data_dir()
    builder = PickapicV2(config=cfg.name if cfg.name == "default" else cfg, data_dir=data_dir,
                         file_format="array_record")
    if builder.is_prepared():
        _check_same_slice(builder, max_shards)
    else:
        files = shards_from_source(source, cfg.splits, max_shards, announce)   # fails early with a clear message
        builder.shard_files, builder.max_shards = files, max_shards
        folders = [os.path.dirname(os.fspath(p)) for split_files in files.values() for p in split_files]
        manual_dir = os.path.commonpath(folders or [os.path.expanduser(os.fspath(source))])
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False))
        except AssertionError as e:  # tfds refuses to write a split with no example
            if "No examples were yielded" not in str(e):
                raise
            summaries = "; ".join(r.summary() for r in getattr(builder, "reports", {}).values())
            raise ValueError(f"pickapic_v2: a split kept no example ({e}); {summaries}") from e
    return builder


def _check_same_slice(builder, max_shards: Optional[int]) -> None:
    """A built dataset is reused only for the same slice (``max_shards``) it was built from."""
    path = pathlib.Path(builder.data_dir) / "metadata.json"
    built = json.loads(path.read_text()).get("max_shards") if path.is_file() else None
    if built != max_shards:
        raise ValueError(f"pickapic_v2: {builder.data_dir} was built with max_shards={built}, not {max_shards}; "
                         "build into another --data_dir (or delete that folder)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "--parquet_dir", dest="source", required=True,
                   help="a hub dataset id (yuvalkirstain/pickapic_v2[@revision]) or a local folder of its parquet "
                   "shards")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir to write pickapic_v2/<config>/1.0.0 into (default: "
                   "$JAXPREF_DATA_DIR, else $XDG_CACHE_HOME/jaxpref/tfds, as the training config's data.data_dir)")
    p.add_argument("--max_shards", type=int, default=None, help="build from the first N shards of each split only "
                   "(a slice; from the hub, only those are fetched)")
    p.add_argument("--resolution", type=int, default=512, help="shorter side; 0 keeps the original JPEG bytes")
    p.add_argument("--no_center_crop", action="store_true")
    p.add_argument("--keep_ties", action="store_true")
    p.add_argument("--no_winner_first", action="store_true")
    p.add_argument("--splits", "--split", dest="splits", default="train,validation_unique,test_unique",
                   help=f"comma list of splits to build, from {KNOWN_SPLITS} (other than the default: a dataset of "
                   "its own, named after them)")
    a = p.parse_args(argv)
    if a.max_shards is not None and a.max_shards < 1:
        p.error(f"--max_shards={a.max_shards}: a number of shards >= 1 (leave it out for every shard)")
    b = build_pickapic(a.source, a.data_dir, max_shards=a.max_shards, resolution=a.resolution or None,
                       center_crop=not a.no_center_crop, drop_ties=not a.keep_ties, winner_first=not a.no_winner_first,
                       splits=tuple(s.strip() for s in a.splits.split(",") if s.strip()))
    print(f"pickapic_v2/{b.builder_config.name}: {dict((k, v.num_examples) for k, v in b.info.splits.items())} "
          f"in {b.data_dir}")
    missing = [s for s in b.builder_config.splits if s not in b.info.splits]
    if missing:   # the source had no shards of them (a run evaluating on data:test_unique then stops at its start)
        print(f"pickapic_v2/{b.builder_config.name}: no shards of {missing} in {a.source}; the build has none of them")


if __name__ == "__main__":
    from jaxpref import console
    console.run_argparse(main, "jaxpref.data.pickapic")
