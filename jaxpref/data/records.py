"""Storage for derived datasets (latent cache, DRO experts): array_record shards of self-describing records.

A record is a flat dict of numpy arrays (any dtype, bfloat16 included), str, bytes, int or float, packed as
a small JSON header plus raw bytes, so reading one costs a header parse and `np.frombuffer` (no protobuf).

A derived dataset is a folder:
  meta.json       what it is (kind, source, settings, fields), 'complete' once finished
  progress.json   shards done so far (the resume marker)
  shard-NNNNN.array_record   one per fixed range of source indices, written atomically (tmp + rename)

`ShardedJob` runs a job shard by shard and skips finished shards when rerun with the same settings.
`RecordSource` reads a finished folder as a random-access data source (len, getitem) for grain.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

_MAGIC = b"JPR1"


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_record(record: dict[str, Any]) -> bytes:
    """Flat dict -> bytes (see module docstring)."""
    header, chunks, offset = [], [], 0
    for key, value in record.items():
        if isinstance(value, str):
            kind, raw, dtype, shape = "str", value.encode("utf-8"), None, None
        elif isinstance(value, bytes):
            kind, raw, dtype, shape = "bytes", value, None, None
        elif isinstance(value, (bool, int, float, np.generic, np.ndarray)):
            arr = np.asarray(value)  # (np.ascontiguousarray would turn scalars into shape [1])
            if arr.dtype == object:
                raise TypeError(f"encode_record: field {key!r} has object dtype")
            kind, raw, dtype, shape = "array", arr.tobytes(order="C"), arr.dtype.name, list(arr.shape)
        else:
            raise TypeError(f"encode_record: field {key!r} of type {type(value).__name__} is not storable")
        header.append([key, kind, dtype, shape, len(raw)])
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC + struct.pack("<I", len(h)) + h + b"".join(chunks)


def decode_record(data: bytes) -> dict[str, Any]:
    if data[:4] != _MAGIC:
        raise ValueError("decode_record: not a jaxpref record")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    pos, out = 8 + n, {}
    for key, kind, dtype, shape, size in header:
        raw = data[pos:pos + size]
        pos += size
        if kind == "str":
            out[key] = raw.decode("utf-8")
        elif kind == "bytes":
            out[key] = bytes(raw)
        else:
            arr = np.frombuffer(raw, dtype=_dtype(dtype)).reshape(shape)
            out[key] = arr[()] if arr.ndim == 0 else arr
    return out


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
    """Where a file is written before its atomic rename: one name per process, so that two runs building the same
    derived dataset at once (two trainings started together on a fresh data dir) never rename each other's file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: pathlib.Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (pathlib.Path, os.PathLike)):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_shard(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records to an array_record file atomically; returns the count."""
    path = pathlib.Path(path)
    tmp = _tmp_path(path)
    writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    n = 0
    try:
        for r in records:
            writer.write(encode_record(r))
            n += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


class ShardedJob:
    """A resumable job over `num_items` source items cut into shards of `shard_size`.

    meta.json records `settings`; rerunning with different settings in the same folder is refused (that
    would mix two datasets), with the same settings it resumes from progress.json.
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, settings: dict, num_items: int, shard_size: int):
        self.dir = pathlib.Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind, self.num_items, self.shard_size = kind, num_items, shard_size
        self.num_shards = max(1, -(-num_items // shard_size))
        settings = json.loads(json.dumps(settings, default=_json_default))
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("kind") != kind or meta.get("settings") != settings or meta.get("num_items") != num_items:
                raise ValueError(f"{self.dir}: holds a different {meta.get('kind')} job (settings {meta.get('settings')}, "
                                 f"{meta.get('num_items')} items); expected {kind} with {settings} over {num_items} "
                                 "items. Use a new output folder or delete this one.")
            self.meta = meta
        else:
            self.meta = {"kind": kind, "settings": settings, "num_items": num_items, "shard_size": shard_size,
                         "num_shards": self.num_shards, "complete": False}
            _write_json(meta_path, self.meta)
        prog = self.dir / "progress.json"
        self.progress = json.loads(prog.read_text()) if prog.exists() else {"done": {}}

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_items, (shard + 1) * self.shard_size))

    def shard_path(self, shard: int, ext: str = "array_record") -> pathlib.Path:
        return self.dir / f"shard-{shard:05d}-of-{self.num_shards:05d}.{ext}"

    def pending(self) -> list[int]:
        return [s for s in range(self.num_shards) if str(s) not in self.progress["done"]]

    def mark_done(self, shard: int, info: dict) -> None:
        self.progress["done"][str(shard)] = info
        _write_json(self.dir / "progress.json", self.progress)

    def done_info(self) -> dict[int, dict]:
        return {int(k): v for k, v in sorted(self.progress["done"].items(), key=lambda kv: int(kv[0]))}

    def finish(self, **extra) -> dict:
        self.meta.update(extra, complete=True)
        _write_json(self.dir / "meta.json", self.meta)
        return self.meta


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict:
    """meta.json of a finished derived dataset; ValueError saying what was expected otherwise."""
    path = pathlib.Path(path)
    meta_path = path / "meta.json"
    what = f"a finished {kind or 'derived'} dataset (meta.json with complete=true, shard-*.array_record)"
    command = {"latents": "cache", "experts": "experts", "scores": "scores"}.get(kind or "", "cache | experts")
    if not meta_path.is_file():
        raise ValueError(f"{path}: expected {what}; found no meta.json. Build it with python -m jaxpref.data.{command}")
    meta = json.loads(meta_path.read_text())
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: expected {what}, found a {meta.get('kind')!r} dataset")
    if not meta.get("complete"):
        prog = path / "progress.json"
        done = len(json.loads(prog.read_text())["done"]) if prog.exists() else 0
        raise ValueError(f"{path}: the {meta.get('kind')} build is incomplete ({done}/{meta.get('num_shards')} shards); "
                         "rerun the same command to resume it")
    return meta


class RecordSource:
    """Random-access source over a finished derived dataset (latent cache or experts)."""

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = pathlib.Path(path)
        self.meta = read_meta(self.path, kind)
        self.files = [os.fspath(self.path / f) for f in self.meta["files"]]
        self._source = None
        self._len = int(self.meta["num_records"])

    def _src(self):
        if self._source is None:
            import grain.python as grain

            self._source = grain.ArrayRecordDataSource(self.files)
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._src()[int(index)])

    def __getitems__(self, indices) -> list[dict]:
        src = self._src()
        raw = src.__getitems__(list(indices)) if hasattr(src, "__getitems__") else [src[int(i)] for i in indices]
        return [decode_record(r) for r in raw]

    def __getstate__(self):  # picklable for grain workers: reopen files there
        return {"path": self.path, "meta": self.meta, "files": self.files, "_source": None, "_len": self._len}

    def __repr__(self) -> str:
        return f"RecordSource({os.fspath(self.path)!r}, kind={self.meta.get('kind')!r}, n={self._len})"
