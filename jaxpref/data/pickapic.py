"""TFDS builder `pickapic_v2`: Pick-a-Pic v2 preference pairs from a local folder of its parquet shards.

Download the parquet files yourself (e.g. `huggingface-cli download yuvalkirstain/pickapic_v2 --repo-type
dataset --local-dir /data/pickapic_v2_parquet`; ~335 GB for train), then:

    python -m jaxpref.data.pickapic --parquet_dir /data/pickapic_v2_parquet --data_dir /data/tfds

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
import math
import os
import pathlib
import re

import pyarrow.parquet as pq
import tensorflow_datasets as tfds

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

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # tfds' own lookup needs the importlib_resources backport
        return common.epath_of(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=common.pair_features(),
                                     homepage="https://huggingface.co/datasets/yuvalkirstain/pickapic_v2",
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        files = find_parquet_files(dl_manager.manual_dir)
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


def build_pickapic(parquet_dir: str | os.PathLike, data_dir: str | os.PathLike, **config) -> PickapicV2:
    """Build pickapic_v2 (config from `pickapic_config(**config)`) into data_dir; no-op if already built.

    Returns the builder; `builder.reports[split]` holds the BuildReport of a build made by this call.
    """
    find_parquet_files(parquet_dir)  # fail early with a clear message
    cfg = pickapic_config(**config)
    builder = PickapicV2(config=cfg.name if cfg.name == "default" else cfg, data_dir=os.fspath(data_dir),
                         file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(parquet_dir), try_download_gcs=False))
        except AssertionError as e:  # tfds refuses to write a split with no example
            if "No examples were yielded" not in str(e):
                raise
            summaries = "; ".join(r.summary() for r in getattr(builder, "reports", {}).values())
            raise ValueError(f"pickapic_v2: a split kept no example ({e}); {summaries}") from e
    return builder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet_dir", required=True, help="folder with the Pick-a-Pic v2 parquet shards")
    p.add_argument("--data_dir", required=True, help="TFDS data_dir to write pickapic_v2/<config>/1.0.0 into")
    p.add_argument("--resolution", type=int, default=512, help="shorter side; 0 keeps the original JPEG bytes")
    p.add_argument("--no_center_crop", action="store_true")
    p.add_argument("--keep_ties", action="store_true")
    p.add_argument("--no_winner_first", action="store_true")
    p.add_argument("--splits", default="train,validation_unique,test_unique")
    a = p.parse_args(argv)
    b = build_pickapic(a.parquet_dir, a.data_dir, resolution=a.resolution or None, center_crop=not a.no_center_crop,
                       drop_ties=not a.keep_ties, winner_first=not a.no_winner_first, splits=tuple(a.splits.split(",")))
    print(f"pickapic_v2/{b.builder_config.name}: {dict((k, v.num_examples) for k, v in b.info.splits.items())} "
          f"in {b.data_dir}")


if __name__ == "__main__":
    main()
