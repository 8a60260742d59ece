"""A run's own files on a local disk or in a bucket (``gs://``, ``s3://``) through one set of functions.

orbax (the checkpoints) and TFDS (the datasets) open every path with ``etils.epath``, so a workdir or a data
dir may be a bucket for them. The files a run writes itself (config.json, metrics.jsonl, the lock, the
evaluations' reports and figures) need the same, and ``open()`` / ``os.path`` / ``os.makedirs`` read
``gs://bucket/run`` as a local folder named ``gs:``. These functions keep a local path's behaviour exactly
(``os.replace``, a real append, ``flock``) and give a bucket path the object store's nearest equivalents:

- an object cannot grow: ``append_text`` rewrites it whole (metrics.jsonl: kilobytes per thousand rows);
- ``replace`` is a copy and a delete (a reader sees the old or the new object, never half of one);
- no lock: ``supports_lock`` is False, and a run says so, as on a network mount without ``flock``.

A bucket needs etils' fsspec backend for its scheme: ``pip install gcsfs`` for ``gs://`` (TFDS and orbax
need it too where TensorFlow is not installed).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

from etils import epath


def is_remote(path) -> bool:
    """A bucket URL (``scheme://...``), not a local path."""
    return "://" in os.fspath(path)


def makedirs(path) -> None:
    """``os.makedirs(path, exist_ok=True)``; a bucket has no folders to make (a no-op there)."""
    if is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path) -> bool:
    return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def remove(path) -> None:
    """Deletes the file ``path`` (local or on a bucket); a missing one is no error."""
    if is_remote(path):
        epath.Path(path).unlink(missing_ok=True)
    elif os.path.exists(path):
        os.remove(path)


def open_file(path, mode: str = "r"):
    """A file object for ``path`` (``open``'s modes; on a bucket, "a" only through ``append_text``)."""
    if is_remote(path):
        if "a" in mode:
            raise ValueError(f"{path}: a bucket object cannot be appended to; use fileio.append_text")
        return epath.Path(path).open(mode)
    return open(path, mode)


def read_text(path) -> str:
    with open_file(path) as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Writes ``path`` whole; a reader never sees half of it (local: a temporary file, then ``os.replace``;
    a bucket: one object upload)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def append_text(path, text: str) -> None:
    """Adds ``text`` at the end of ``path`` (created if missing)."""
    if is_remote(path):
        old = read_text(path) if isfile(path) else ""
        write_text(path, old + text)
        return
    with open(path, "a") as f:
        f.write(text)


class _BucketAppend:
    """``open(path, "a")`` for a bucket object: the text written is added to it at each ``flush``/``close``."""

    def __init__(self, path):
        self.path, self._pending = path, []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            append_text(self.path, "".join(self._pending))
            self._pending = []

    def close(self) -> None:
        self.flush()


def open_append(path):
    """``open(path, "a")``; on a bucket, a writer whose ``flush`` rewrites the object with the new text added."""
    return _BucketAppend(path) if is_remote(path) else open(path, "a")


@contextlib.contextmanager
def staged(path):
    """A local path at which to write ``path`` (a file or a folder) with writers that only know local files
    (PIL, matplotlib, numpy, safetensors): ``path`` itself when local; for a bucket, a temporary local one
    that is copied up when the block ends without an error."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(path).rstrip("/")))
        yield local
        upload(local, path)


def upload(local: str, path) -> None:
    """Copies a local file, or a local folder's files (sub-folders included), to ``path``."""
    files = ([(local, "")] if os.path.isfile(local) else
             [(os.path.join(root, name), os.path.relpath(os.path.join(root, name), local))
              for root, _, names in os.walk(local) for name in names])
    for src, rel in files:
        dst = epath.Path(path) / rel if rel else epath.Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
            dst.write_bytes(f.read())


def replace(src, dst) -> None:
    """``os.replace`` for local paths; on a bucket, a copy to ``dst`` and the deletion of ``src``."""
    if is_remote(src) or is_remote(dst):
        epath.Path(src).replace(dst)
    else:
        os.replace(src, dst)


def check_writable(folder) -> None:
    """Raises OSError when this process cannot create a file in ``folder`` (made first if missing)."""
    makedirs(folder)
    if not is_remote(folder):
        import tempfile

        with tempfile.TemporaryFile(dir=folder):
            return
    probe = epath.Path(folder) / f".write_check.{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()


def supports_lock(path) -> bool:
    """Whether an exclusive ``flock`` on a file under ``path`` means anything (local filesystems)."""
    return not is_remote(path)
