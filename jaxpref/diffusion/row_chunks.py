"""Rows of a batch regrouped into chunks by how much work each row needs, and put back.

A masked ``lax.scan`` computes a step for the whole batch as long as one row needs it. Ordering the rows
by the number of steps they need and splitting them into chunks lets each chunk skip the steps none of
its rows needs (``lax.cond``), so rows that finish early stop costing model calls under jit.

The order is taken within ``groups`` equal blocks of consecutive rows (a device's share of a batch
split over devices), and chunk c holds rows c·r .. (c+1)·r − 1 of every block: moving rows into chunks
and back is a gather inside each block, which moves no data between devices.
"""
from __future__ import annotations

import math

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


def expected_rows_run(step_prob, rows: int, chunks: int = 1, groups: int = 1, rows_per_draw: int = 1) -> float:
    """Expected model rows a chunked masked scan computes (each chunk computes all its rows at every step
    one of them needs), the rows being ``rows / rows_per_draw`` independent draws, each repeated
    ``rows_per_draw`` times (a pair's two images share their t), and a draw needing step k with probability
    ``step_prob[k]``. With chunks > 1 each draw must need a prefix of the steps (so the k-th row in an
    ordered block needs step j iff at least k of the block's draws do); with one chunk any pattern.

    The chunk holding rows c·r .. of every block (r rows per block) runs step j unless, in every block, fewer
    than ⌊c·r / rows_per_draw⌋ + 1 of its q draws need it: P = 1 − (1 − P[Bin(q, p_j) >= k])^groups."""
    check_chunks(rows, chunks, groups)
    per_block = rows // groups
    draws = per_block // rows_per_draw
    per_chunk_block = per_block // chunks
    total = 0.0
    for c in range(chunks):
        k = c * per_chunk_block // rows_per_draw + 1
        for p in step_prob:
            p = float(p)
            at_least_k = sum(math.comb(draws, i) * p ** i * (1.0 - p) ** (draws - i) for i in range(k, draws + 1))
            total += (1.0 - (1.0 - at_least_k) ** groups) * rows / chunks
    return total
