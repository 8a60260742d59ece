"""jaxpref.fileio on a local folder and on a bucket: a ``gs://`` bucket faked by fsspec's in-memory filesystem
(registered as etils' ``gs`` backend, as gcsfs is on a real host), read back through the fake store itself."""
import importlib
import os

import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from jaxpref import fileio


class FakeGCS(MemoryFileSystem):
    """An in-memory ``gs://`` store with gcsfs's constructor argument."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch):
    FakeGCS.store.clear()
    for name in ("gs", "gcs"):
        monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield "gs://bucket/run1"
    backend.fsspec_backend._get_filesystem.cache_clear()


def _stored(path: str) -> str:
    return FakeGCS.store["/" + path[len("gs://"):]].getvalue().decode()


def test_a_bucket_path_is_not_a_local_folder(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fileio.makedirs(bucket)
    fileio.check_writable(bucket)
    assert not os.path.exists("gs:")                 # os.makedirs would have made a local gs:/bucket/run1
    assert fileio.is_remote(bucket) and not fileio.is_remote(str(tmp_path)) and not fileio.supports_lock(bucket)


@pytest.mark.parametrize("where", ["bucket", "local"])
def test_write_append_replace_read(where, bucket, tmp_path):
    root = bucket if where == "bucket" else str(tmp_path / "run1")
    fileio.makedirs(root)
    metrics = os.path.join(root, "metrics.jsonl")
    fileio.append_text(metrics, '{"step": 1}\n')
    fileio.append_text(metrics, '{"step": 2}\n')
    fileio.write_text(os.path.join(root, "config.json"), "{}")
    fileio.write_text(metrics + ".tmp", '{"step": 1}\n')
    assert fileio.isfile(metrics) and fileio.isdir(root) and not fileio.isfile(os.path.join(root, "none"))
    assert fileio.read_text(metrics) == '{"step": 1}\n{"step": 2}\n'
    fileio.replace(metrics + ".tmp", metrics)        # drop_rows_after's rewrite
    assert fileio.read_text(metrics) == '{"step": 1}\n' and not fileio.exists(metrics + ".tmp")
    with fileio.open_file(os.path.join(root, "grid.png"), "wb") as f:
        f.write(b"\x89PNG")
    fileio.write_text(os.path.join(root, "finished.json"), "{}")
    fileio.remove(os.path.join(root, "finished.json"))
    fileio.remove(os.path.join(root, "finished.json"))   # a missing file is no error
    assert not fileio.exists(os.path.join(root, "finished.json"))
    if where == "bucket":
        assert _stored(metrics) == '{"step": 1}\n' and _stored(os.path.join(root, "config.json")) == "{}"
        assert FakeGCS.store["/bucket/run1/grid.png"].getvalue() == b"\x89PNG"
        with pytest.raises(ValueError, match="append_text"):
            fileio.open_file(metrics, "a")
    else:
        assert sorted(os.listdir(root)) == ["config.json", "grid.png", "metrics.jsonl"]


def test_a_training_run_writes_its_files_in_the_bucket(bucket, world, tmp_path, monkeypatch):
    """Two updates of the embedded model with --workdir on the fake bucket: config.json, metrics.jsonl and the
    exported UNet land in the bucket, the lock is off with a warning, and no local folder "gs:" appears.
    orbax writes gs:// through google-cloud-storage and tensorstore, which an fsspec store cannot stand in for:
    the checkpoints alone go to a local folder here."""
    import json

    import train_helpers as th
    from jaxpref import checkpoint as checkpoint_lib
    from jaxpref import train as train_lib

    local_checkpoints = tmp_path / "orbax"

    class LocalCheckpoints(checkpoint_lib.CheckpointManager):
        def __init__(self, workdir, **kwargs):
            assert workdir == bucket
            super().__init__(str(local_checkpoints), **kwargs)

    monkeypatch.setattr(train_lib.checkpoint_lib, "CheckpointManager", LocalCheckpoints)
    monkeypatch.chdir(tmp_path)
    warnings = []
    monkeypatch.setattr(checkpoint_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    config = th.tiny_dpo_config(*world, total_steps=2, **{"eval.final": False, "checkpoint.every": 2})
    train_lib.train(config, bucket)

    rows = [json.loads(line) for line in _stored(bucket + "/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert json.loads(_stored(bucket + "/config.json"))["total_steps"] == 2
    assert "/bucket/run1/export/unet/diffusion_pytorch_model.safetensors" in FakeGCS.store
    assert json.loads(_stored(bucket + "/finished.json"))["step"] == 2
    assert (local_checkpoints / "checkpoints" / "2").is_dir()
    assert sum("no lock" in w for w in warnings) == 1
    assert not os.path.exists(tmp_path / "gs:") and not os.path.exists("gs:")
