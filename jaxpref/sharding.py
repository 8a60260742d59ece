"""Device mesh, sharding rules over pytrees, and the global batch.

The mesh has two axes: ``data`` (pure data parallel) and ``fsdp`` (data parallel whose devices also
split the params and optimizer state). A batch is split over both.

How a tree is split is data, as in big_vision: a list of ``(regex, rule)`` pairs matched against each
leaf's path ("params/down_blocks_0/attentions_0/.../kernel", "opt_state/0/mu/...", "ref/...",
"method_state/negatives/latents"); the first match decides. Rules:
  "replicate"           every device holds the whole leaf
  "fsdp"                the largest dimension divisible by the fsdp axis is split over it, for leaves of
                        at least 2**14 elements (norms and biases replicate); "fsdp(min_size=N)" sets it
  "rows"                the leading axis over every device where it divides (buffers, batches)
The config's ``sharding_rules`` apply to the state and the frozen params; a method adds rules for its
own state (``Method.state_sharding_rules``).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 14  # tensors smaller than this (norms, biases) replicate
DEFAULT_RULES = ((".*", "fsdp"),)
_RULE = re.compile(r"^(replicate|fsdp|rows)(?:\(min_size=(\d+)\))?$")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices of all hosts; one axis may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} != {n} devices; set one axis to -1 to fill")
    # Auto axes: XLA propagates shardings through the step (jax.make_mesh defaults to Explicit axes).
    auto = (AxisType.Auto, AxisType.Auto)
    if devices == list(jax.devices()):
        return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (pair) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Shards the largest dimension divisible by ``fsdp_size`` of a big tensor over ``fsdp``."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def parse_rule(rule: str):
    """"fsdp(min_size=N)" -> ("fsdp", N); ValueError naming the supported rules."""
    m = _RULE.match(rule.replace(" ", ""))
    if not m or (m.group(2) and m.group(1) != "fsdp"):
        raise ValueError(f"sharding rule {rule!r}: supported 'replicate', 'fsdp', 'fsdp(min_size=N)', 'rows'")
    return m.group(1), int(m.group(2) or FSDP_MIN_SIZE)


def _leaf_spec(mesh: Mesh, shape, rule: str) -> P:
    kind, min_size = parse_rule(rule)
    if kind == "fsdp":
        return fsdp_spec(shape, mesh.shape["fsdp"], min_size)
    if kind == "rows" and len(shape) and shape[0] % mesh.size == 0:
        return P(BATCH_AXES)
    return P()


def path_name(path) -> str:
    """A tree path as "a/b/0/c" (dict keys, dataclass fields, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_sharding(mesh: Mesh, tree: Any, rules: Sequence = DEFAULT_RULES, prefix: str = "") -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs: per leaf, the first rule whose regex
    matches its path (``prefix`` + path) from the start; unmatched leaves replicate."""
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def one(path, x):
        name = prefix + path_name(path)
        rule = next((r for pattern, r in compiled if pattern.match(name)), "replicate")
        return NamedSharding(mesh, _leaf_spec(mesh, x.shape, rule))
    return jax.tree_util.tree_map_with_path(one, tree)


def rows_sharding(mesh: Mesh, tree: Any) -> Any:
    """Leading axis over all devices where it divides, replicated otherwise (buffers, batches)."""
    return tree_sharding(mesh, tree, ((".*", "rows"),))


def put_global_batch(target: Mesh | NamedSharding, local_batch: dict) -> dict:
    """Assembles each process's rows into global arrays on ``target`` (a NamedSharding, or a mesh: split
    over its batch axes); string fields (e.g. captions) stay host-local numpy."""
    sharding = batch_sharding(target) if isinstance(target, Mesh) else target
    return {k: v if np.asarray(v).dtype.kind in "USO" else
            jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def host_params(params: Any) -> Any:
    """Params as host numpy; across processes a gather (every process must call it)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def bytes_per_device(tree: Any) -> int:
    """Bytes of the addressable shard on one device, summed over leaves (for memory tables)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.addressable_shards[0].data
        total += shard.size * shard.dtype.itemsize
    return total
