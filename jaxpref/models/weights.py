"""PyTorch-format checkpoints (diffusers / HF safetensors) <-> Flax param pytrees, without torch.

Our Flax modules are named after the checkpoint's own names, so the conversion is a rule, not a
table: a torch key ``down_blocks.0.resnets.1.conv1.weight`` is the Flax path
``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` (a list index joins its list's name with
``_``), and the leaf is renamed and re-laid-out by its Flax role:

  kernel (4-D)  <- weight OIHW, transposed to HWIO         (nn.Conv)
  kernel (2-D)  <- weight [out, in], transposed to [in, out] (nn.Dense; a 1x1 conv weight is squeezed)
  scale         <- weight                                    (nn.LayerNorm / nn.GroupNorm)
  embedding     <- weight                                    (nn.Embed)
  anything else <- the same name                             (raw params: class_embedding, logit_scale)

The conversion is driven by the Flax param tree (from ``jax.eval_shape`` of the init), so every
param is loaded or the call fails, and every checkpoint tensor is used or listed in the error.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

# ---------------------------------------------------------------------------------------------
# safetensors I/O (our own reader/writer: numpy memmaps, bf16 through ml_dtypes, no torch).

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into {name: array} (memory-mapped, zero-copy until used).

    Every tensor's bytes are checked against the file size and its dtype and shape before any is mapped,
    so a truncated download fails naming the file and the tensor, not as a bare reshape error.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise ValueError(f"{path} is truncated or corrupt (its header needs bytes 8..{8 + header_len}, file has "
                             f"{size}); download or export it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    base = 8 + header_len
    for name, info in header.items():
        _check_tensor_bytes(path, name, info, base, size)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=base) if size > base else np.zeros(0, np.uint8)
    return {name: data[info["data_offsets"][0]:info["data_offsets"][1]].view(np.dtype(_ST_DTYPES[info["dtype"]]))
            .reshape(info["shape"]) for name, info in header.items()}


def _check_tensor_bytes(path: str, name: str, info: dict, base: int, size: int):
    """Raises unless the header's entry for ``name`` fits in the file and its byte span equals dtype x shape."""
    if info.get("dtype") not in _ST_DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    start, end = (int(v) for v in info["data_offsets"])
    if not 0 <= start <= end or base + end > size:
        raise ValueError(f"{path} is truncated or corrupt (tensor {name} needs bytes {base + start}..{base + end}, "
                         f"file has {size}); download or export it again")
    want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
    if end - start != want:
        raise ValueError(f"{path} is corrupt (tensor {name}: {info['dtype']} {list(info['shape'])} is {want} bytes, "
                         f"its data offsets {start}..{end} span {end - start}); download or export it again")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes {name: array} as a .safetensors file (sorted names, 8-byte aligned header)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray makes 0-d arrays 1-d
        if arr.dtype not in _NP_TO_ST:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def read_checkpoint_folder(folder: str, stem: str, variant: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Reads ``{stem}[.variant].safetensors`` or its sharded ``.index.json`` form from a folder.

    Returns (tensors, description of the files read) — the description goes into error messages.
    """
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single = os.path.join(folder, name)
    index = single + ".index.json"
    if os.path.isfile(single):
        return read_safetensors(single), single
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors listed in the index are absent from the shards: {missing[:5]}")
        return tensors, index
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder does not exist"
    raise ValueError(f"{folder}: expected {name} or {name}.index.json (safetensors weights); found {present}")


def read_config(folder: str, filename: str = "config.json") -> dict:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing model config (expected a diffusers/HF model folder)")
    with open(path) as f:
        return json.load(f)


def write_config(folder: str, config: Mapping[str, Any], filename: str = "config.json"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, filename), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Name and layout rules.

_INDEXED = re.compile(r"^(.*)_(\d+)$")
# Checkpoint names that end in _<digit> but are module names, not list items (diffusers'
# TimestepEmbedding.linear_1 / linear_2). Every other trailing _<digit> is a list index.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


def torch_key(flax_path: Iterable[str]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'.

    A trailing ``_<digits>`` joins a list's name and index, except for ``LITERAL_NAMES``.
    """
    *modules, leaf = list(flax_path)
    parts = []
    for m in modules:
        match = None if m in LITERAL_NAMES else _INDEXED.match(m)
        parts.extend([match.group(1), match.group(2)] if match else [m])
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def torch_to_flax_array(leaf: str, arr: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4 and len(flax_shape) == 4:
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif arr.ndim == 4 and len(flax_shape) == 2 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0].T  # 1x1 conv stored where the model has a Dense
        elif arr.ndim == 2:
            arr = arr.T
    return arr


def flax_to_torch_array(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if arr.ndim == 2:
            return arr.T
    return arr


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def convert_torch_to_flax(
    tensors: Mapping[str, np.ndarray],
    flax_shapes: Any,
    source: str,
    *,
    dtype=np.float32,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
) -> Any:
    """Builds the Flax param tree shaped like ``flax_shapes`` from a torch state dict.

    Args:
      tensors: torch-named arrays (from ``read_checkpoint_folder``).
      flax_shapes: the param tree of ShapeDtypeStructs (``jax.eval_shape(module.init, ...)['params']``).
      source: the file(s) the tensors came from, named in every error.
      rename: maps a checkpoint key to our key (legacy names, e.g. the old VAE attention names).
      ignore: regexes of checkpoint keys that are buffers, not params (e.g. ``position_ids``).
    Raises:
      ValueError naming the file, the tensor and both shapes on any mismatch, missing or unused tensor.
    """
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    ignore_res = [re.compile(p) for p in ignore]
    used = set()
    errors = []

    def load_leaf(path, shape_struct):
        names = _path_names(path)
        key = torch_key(names)
        if key not in tensors:
            errors.append(f"missing tensor {key} (Flax param {'/'.join(names)}, shape {tuple(shape_struct.shape)})")
            return None
        used.add(key)
        arr = torch_to_flax_array(names[-1], np.asarray(tensors[key]), tuple(shape_struct.shape))
        if tuple(arr.shape) != tuple(shape_struct.shape):
            errors.append(f"tensor {key}: checkpoint shape {tuple(tensors[key].shape)} (as Flax {tuple(arr.shape)})"
                          f" does not match the model's {tuple(shape_struct.shape)}")
            return None
        return np.asarray(arr, dtype=dtype)

    params = jax.tree_util.tree_map_with_path(load_leaf, flax_shapes)
    unused = sorted(k for k in tensors if k not in used and not any(r.search(k) for r in ignore_res))
    if unused:
        errors.append(f"{len(unused)} checkpoint tensors unused by the model config: {unused[:20]}"
                      + (" ..." if len(unused) > 20 else ""))
    if errors:
        raise ValueError(f"{source}: checkpoint does not match the model config:\n  " + "\n  ".join(errors[:30]))
    return params


def convert_flax_to_torch(params: Any, dtype=None) -> dict[str, np.ndarray]:
    """Flattens a Flax param tree into a torch-named, torch-laid-out state dict of numpy arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _path_names(path)
        arr = flax_to_torch_array(names[-1], np.asarray(jax.device_get(leaf)))
        if dtype is not None:
            arr = arr.astype(dtype)
        out[torch_key(names)] = np.ascontiguousarray(arr).reshape(arr.shape)  # keep 0-d (logit_scale) 0-d
    return out
