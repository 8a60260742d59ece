"""Rows of a batch regrouped into chunks by how much work each row needs, and put back.

A masked ``lax.scan`` computes a step for the whole batch as long as one row needs it. Ordering the rows
by the number of steps they need and splitting them into chunks lets each chunk skip the steps none of
its rows needs (``lax.cond``), so rows that finish early stop costing model calls under jit.

The order is taken within ``groups`` equal blocks of consecutive rows (a device's share of a batch
split over devices), and chunk c holds rows c·r .. (c+1)·r − 1 of every block: moving rows into chunks
and back is a gather inside each block, which moves no data between devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def most_work_first(work: jax.Array, groups: int = 1) -> jax.Array:
    """[groups, n] block-local row indices ordering each block's rows by ``work`` [groups · n], most first
    (ties keep their order)."""
    return jnp.argsort(-work.reshape(groups, -1), axis=1, stable=True)


def _take_rows(a: jax.Array, index: jax.Array) -> jax.Array:
    """a [G, n, ...] with each block's rows taken at ``index`` [G, n]."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def to_chunks(a: jax.Array, order: jax.Array, chunks: int) -> jax.Array:
    """a [B, ...] -> [chunks, B / chunks, ...]: each block's rows in ``order`` [G, B / G], chunk c made of
    rows c·r .. (c+1)·r − 1 of every block (r = B / (G · chunks))."""
    groups, n = order.shape
    a = _take_rows(a.reshape(groups, n, *a.shape[1:]), order)
    a = a.reshape(groups, chunks, n // chunks, *a.shape[2:])
    return jnp.swapaxes(a, 0, 1).reshape(chunks, groups * (n // chunks), *a.shape[3:])


def from_chunks(a: jax.Array, order: jax.Array) -> jax.Array:
    """The inverse of ``to_chunks``: [chunks, B / chunks, ...] -> [B, ...] in the original row order."""
    groups, n = order.shape
    chunks = a.shape[0]
    a = a.reshape(chunks, groups, n // chunks, *a.shape[2:])
    a = jnp.swapaxes(a, 0, 1).reshape(groups, n, *a.shape[3:])
    return _take_rows(a, jnp.argsort(order, axis=1)).reshape(groups * n, *a.shape[2:])


def check_chunks(batch: int, chunks: int, groups: int = 1) -> None:
    if chunks < 1 or groups < 1 or batch % (chunks * groups):
        raise ValueError(f"chunks={chunks} x groups={groups} must divide the batch of {batch} rows")
