"""Device mesh, sharding rules over pytrees, and the jitted step with explicit in/out shardings.

The mesh has two axes: ``data`` (pure data parallel) and ``fsdp`` (data parallel whose devices also
split the params and optimizer state). A batch is split over both; a big tensor is split over
``fsdp`` along its largest divisible dimension (big_vision's ``fsdp`` tactic); small ones replicate.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 14  # tensors smaller than this (norms, biases) replicate


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


def params_sharding(mesh: Mesh, tree: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedShardings for params-like trees (params, optimizer state, EMA): the fsdp rule per leaf."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), tree)


def rows_sharding(mesh: Mesh, tree: Any) -> Any:
    """Leading axis over all devices where it divides, replicated otherwise (buffers, batches)."""
    n = mesh.size

    def rule(x):
        if x.ndim and x.shape[0] % n == 0:
            return NamedSharding(mesh, P(BATCH_AXES))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map(rule, tree)


def state_sharding(mesh: Mesh, state_shapes: Any) -> Any:
    """Shardings for a ``TrainState`` of ShapeDtypeStructs: fsdp for weights, rows for DRO's buffer."""
    sharded = params_sharding(mesh, state_shapes)
    if getattr(state_shapes, "negatives", None) is not None:
        sharded = sharded.replace(negatives=rows_sharding(mesh, state_shapes.negatives))
    return sharded


def init_sharded(init_fn: Callable, mesh: Mesh, shardings_fn: Callable, *args):
    """Runs ``init_fn(*args)`` under jit with out-shardings from its ``eval_shape``: born sharded."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = shardings_fn(mesh, shapes)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings, frozen_shardings, batch_shapes):
    """``train_step(state, batch, rng, frozen)`` compiled with explicit shardings and a donated state."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, rows_sharding(mesh, batch_shapes), replicated(mesh), frozen_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def put_global_batch(mesh: Mesh, local_batch: Any) -> Any:
    """Assembles each process's rows into global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  local_batch)


def bytes_per_device(tree: Any) -> int:
    """Bytes of the addressable shard on one device, summed over leaves (for memory tables)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.addressable_shards[0].data
        total += shard.size * shard.dtype.itemsize
    return total
