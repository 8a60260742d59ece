"""Reward-model weight files as {name: numpy array}: .safetensors, .npz and torch.save zip archives
(.pt/.pth/.bin, read by ``torch_archive`` without torch and without running pickled code); only
pre-1.6 torch pickles need torch (``torch.load(weights_only=True)``).

Published reward models ship as torch files (HPS_v2_compressed.pt, sa_0_4_vit_l_14_linear.pth,
ImageReward.pt); ``save_numpy_state_dict`` writes a .safetensors/.npz copy of any of them.
"""
from __future__ import annotations

import os
from typing import Mapping

import ml_dtypes
import numpy as np

from jaxpref.models import weights
from jaxpref.rewards import torch_archive

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES


def _torch_to_numpy(obj) -> np.ndarray:
    import torch

    if obj.dtype in (torch.bfloat16, torch.float16):
        obj = obj.float()
    return obj.detach().cpu().numpy()


def _unwrap(obj, path: str) -> Mapping:
    if isinstance(obj, Mapping) and "state_dict" in obj:  # HPSv2's {'state_dict': ..., 'epoch': ...}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor); got {type(obj).__name__}")
    return obj


def _read_torch_archive(path: str) -> dict:
    """A torch zip archive without torch; half precision widened to float32 as ``_torch_to_numpy`` does."""
    tensors = _unwrap(torch_archive.load(path), path)
    widen = lambda a: a.astype(np.float32) if a.dtype in (np.float16, ml_dtypes.bfloat16) else a
    return {k: widen(v) for k, v in tensors.items() if isinstance(v, np.ndarray)}


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path}: a torch pickle needs torch to read; convert it once where torch is installed "
                         "(jaxpref.rewards.state_dicts.save_numpy_state_dict) to .safetensors or .npz") from e
    try:
        # weights_only: a reward checkpoint is tensors in dicts; never run a pickle's code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad pickle
        raise ValueError(f"{path}: cannot read as a torch state dict ({type(e).__name__}: {e})") from e
    return {k: _torch_to_numpy(v) for k, v in _unwrap(obj, path).items() if hasattr(v, "detach")}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} from .safetensors / .npz / torch pickle; a DDP ``module.`` prefix is dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file; expected one of {SUFFIXES}")
    if path.endswith(".safetensors"):
        tensors = {k: np.asarray(v) for k, v in weights.read_safetensors(path).items()}
    elif path.endswith(".npz"):
        with np.load(path) as data:
            tensors = {k: data[k] for k in data.files}
    elif path.endswith(TORCH_SUFFIXES):
        tensors = _read_torch_archive(path) if torch_archive.is_torch_zip(path) else _read_torch(path)
    else:
        raise ValueError(f"{path}: unknown weights format; expected one of {SUFFIXES}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}


def save_numpy_state_dict(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes {name: array} as .safetensors or .npz (by suffix): torch-free copies of reward weights."""
    if path.endswith(".safetensors"):
        weights.write_safetensors(path, {k: np.asarray(v) for k, v in tensors.items()})
    elif path.endswith(".npz"):
        np.savez(path, **{k: np.asarray(v) for k, v in tensors.items()})
    else:
        raise ValueError(f"{path}: expected a .safetensors or .npz path")


def find_weights_file(folder: str, names: tuple[str, ...], what: str) -> str:
    """The first of ``names`` present in ``folder``, else the only weights file there; ValueError otherwise."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(f for f in os.listdir(folder) if f.endswith(SUFFIXES))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    raise ValueError(f"{folder}: {what} expects one weights file named one of {list(names)} (or a single "
                     f"{'/'.join(SUFFIXES)} file); found {found or sorted(os.listdir(folder))}")
