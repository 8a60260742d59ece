"""A Hugging Face hub cache built by the tests: the layout huggingface_hub reads offline.

``<HF_HOME>/hub/<type>s--org--name/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/<path>`` links to
it, and ``refs/main`` names the commit, as ``huggingface_hub.snapshot_download`` leaves them.
"""
from __future__ import annotations

import hashlib
import os
import pathlib


def add_repo(hf_home, repo_id: str, files: dict, *, repo_type: str = "model", commit: str | None = None,
             branch: str = "main") -> pathlib.Path:
    """Writes ``files`` ({repo path: bytes, or a local file or folder to copy in}) as a cached snapshot of
    ``repo_id``; returns the snapshot folder."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    storage = pathlib.Path(hf_home) / "hub" / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for path, content in _expand(files).items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / branch).write_text(commit)
    return snapshot


def _expand(files: dict) -> dict[str, bytes]:
    out = {}
    for path, content in files.items():
        if isinstance(content, (str, os.PathLike)) and os.path.isdir(content):
            root = pathlib.Path(content)
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    out[f"{path}/{f.relative_to(root).as_posix()}".lstrip("/")] = f.read_bytes()
        elif isinstance(content, (str, os.PathLike)):
            out[path] = pathlib.Path(content).read_bytes()
        else:
            out[path] = bytes(content)
    return out
