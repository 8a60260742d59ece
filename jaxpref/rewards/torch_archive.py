"""torch.save files (the zip format torch writes since 1.6) read into numpy without torch or pickled code.

Such a file is a zip archive: ``<root>/data.pkl`` pickles the object tree and each tensor's bytes lie in
``<root>/data/<key>`` (``<root>/byteorder`` says their byte order). In the pickle a tensor is a call
to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
persistent id ``("storage", torch.FloatStorage, key, location, numel)``. The Unpickler here resolves
only those names (the tensor and parameter rebuilders, the storage types, ``collections.OrderedDict``,
``torch.Size``), the same kind of allowlist torch's ``weights_only=True`` enforces, each to a numpy
stand-in; any other global in the pickle raises, so nothing the file names is imported or run.
Older (pre-zip) torch pickles are not read here: ``state_dicts`` hands those to ``torch.load``.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsupportedArchive(ValueError):
    """The file is not a torch zip archive, or its pickle names something outside the allowlist."""


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """A view of ``storage`` (1-D) with torch's size/stride (in elements), copied out."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size or any(s < 0 for s in stride):
        raise UnsupportedArchive(f"tensor of size {size} stride {stride} at offset {offset} does not fit its "
                                 f"storage of {storage.size} elements (corrupt file?)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if state:
        raise UnsupportedArchive(f"a tensor subclass with state {sorted(state)} is not a plain weight")
    return func(*args)


class _TensorType:
    """Stands for torch.Tensor / nn.Parameter where the pickle names the type of a rebuilt tensor."""


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str, path: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.byteorder, self.path = archive, root, byteorder, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsupportedArchive(f"{self.path}: the pickle names {module}.{name}, which a weights file has no "
                                 "need of; refusing to load it (only tensors, dicts and lists are read)")

    def persistent_load(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsupportedArchive(f"{self.path}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.root}data/{key}")
            dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) < int(numel) * dtype.itemsize:
                raise UnsupportedArchive(f"{self.path}: storage {key} holds {len(raw)} bytes, fewer than its "
                                         f"{numel} {storage_type.name} elements")
            self.storages[key] = np.frombuffer(raw, dtype, count=int(numel)).astype(storage_type.dtype)
        return self.storages[key]


def is_torch_zip(path: str) -> bool:
    """True for a torch.save zip archive (a ``*/data.pkl`` member), False for anything else."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("data.pkl") and n.count("/") == 1 for n in archive.namelist())


def load(path: str) -> Any:
    """The object a torch.save zip archive holds, tensors as numpy arrays (see the module docstring)."""
    if not zipfile.is_zipfile(path):
        raise UnsupportedArchive(f"{path}: not a torch zip archive (a pre-1.6 torch pickle, or not torch at all)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsupportedArchive(f"{path}: expected one <root>/data.pkl in the archive; found "
                                     f"{pickles or names[:5]}")
        root = pickles[0][:-len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise UnsupportedArchive(f"{path}: byteorder record {byteorder!r}; expected 'little' or 'big'")
        try:
            return _Unpickler(archive.read(pickles[0]), archive, root, byteorder, path).load()
        except UnsupportedArchive:
            raise
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, AttributeError) as e:
            raise UnsupportedArchive(f"{path}: cannot unpickle the torch archive ({type(e).__name__}: {e})") from e
