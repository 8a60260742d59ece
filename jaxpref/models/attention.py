"""Scaled dot-product attention behind one switch (``config.attention``).

Dense XLA attention materialises the fp32 logits, [B, N, T, S]: at SD1.5's 4096 tokens that is 64 MiB per
sample and head, kept again for the backward pass. The backends here compute the same function:

- ``xla``: ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in fp32);
- ``cudnn``: its cuDNN flash attention (GPU, bf16/fp16, head dim a multiple of 8);
- ``chunked``: pure JAX, query blocks in ``lax.map``, key blocks in ``lax.scan`` with an online softmax and
  fp32 accumulation; each query block is rematerialised in the backward pass, so memory is
  O(block × tokens) forward and backward, on any platform;
- ``auto``: cuDNN where it supports the call, otherwise ``chunked`` for long sequences, ``xla`` for short ones.

Layout as ``jax.nn.dot_product_attention``: q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("auto", "xla", "cudnn", "chunked")
# Named in the design but not built; selecting one is an error that says what to use instead.
NOT_YET = {"pallas_tpu": "Pallas flash attention for TPU is not implemented yet; use 'auto' or 'chunked' "
                         "(O(block × tokens) memory on TPU too)"}

Q_BLOCK = 512
KV_BLOCK = 1024
# auto off cuDNN: dense below this many query x key pairs per head, chunked from it. Measured on XLA:CPU
# (8 heads of 40, fp32): up to 256 x 256 the two cost the same time and memory, so short sequences keep the
# dense numerics; at 1024 x 1024 chunked needs 13x less forward temporaries (5 vs 64 MiB) at equal speed, and
# at 4096 x 4096 21x less (50 vs 1024 MiB forward, 147 vs 2053 MiB with the gradient) and runs 2-3x faster.
CHUNKED_FROM = 512 * 512
_MASKED = -1e30  # a finite -inf: masked logits and the empty running max stay NaN-free in the gradient


def check_backend(name: str) -> str:
    """``name`` if it is a backend; ValueError saying what exists otherwise."""
    if name in NOT_YET:
        raise ValueError(f"attention backend {name!r}: {NOT_YET[name]}")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported {BACKENDS}")
    return name


def resolve(backend: str, q, k, platform: str | None = None) -> str:
    """The concrete backend ``backend`` means for this call (``auto`` decides by platform, dtype and size)."""
    check_backend(backend)
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda") and cudnn_supports(q):
        return "cudnn"
    return "chunked" if q.shape[1] * k.shape[1] >= CHUNKED_FROM else "xla"


def cudnn_supports(q) -> bool:
    """Whether cuDNN flash attention takes q: bf16/fp16, head dim a multiple of 8 up to 128 (256 on Hopper+)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    head_dim = q.shape[-1]
    return head_dim % 8 == 0 and head_dim <= (256 if _gpu_capability() >= 9.0 else 128)


def _gpu_capability() -> float:
    try:
        return float(getattr(jax.devices()[0], "compute_capability", 0.0))
    except (ValueError, RuntimeError):
        return 0.0


def dot_product_attention(q, k, v, backend: str = "xla"):
    """softmax(q kᵀ / √H) v by ``backend`` (one of ``BACKENDS``)."""
    backend = resolve(backend, q, k)
    if backend == "chunked":
        return chunked_attention(q, k, v, Q_BLOCK, KV_BLOCK)
    if backend == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
        raise ValueError(f"attention backend 'cudnn' needs a GPU, this process runs on {jax.default_backend()!r}; "
                         "use 'auto', 'chunked' or 'xla'")
    return jax.nn.dot_product_attention(q, k, v, implementation=backend)


def chunked_attention(q, k, v, q_block: int = Q_BLOCK, kv_block: int = KV_BLOCK):
    """Exact attention a block of queries at a time; no [T, S] array exists, forward or backward.

    Token counts need not divide the blocks: queries are zero-padded (their rows dropped), padded keys masked.
    """
    b, t, n, _ = q.shape
    s = k.shape[1]
    qb, kb = min(q_block, t), min(kv_block, s)
    q_blocks = _split(q, qb)
    k_blocks, v_blocks = _split(k, kb), _split(v, kb)
    valid = None if s % kb == 0 else (jnp.arange(k_blocks.shape[0] * kb) < s).reshape(-1, kb)
    attend = jax.checkpoint(functools.partial(_query_block, scale=q.shape[-1] ** -0.5))
    out = lax.map(lambda qi: attend(qi, k_blocks, v_blocks, valid), q_blocks)  # [nq, B, qb, N, Hv]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, n, v.shape[-1])[:, :t]


def _split(x, block: int):
    """[B, L, N, H] -> [ceil(L / block), B, block, N, H], zero-padded at the end."""
    b, length, n, h = x.shape
    pad = -length % block
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
    return jnp.moveaxis(x.reshape(b, -1, block, n, h), 1, 0)


def _query_block(q, k_blocks, v_blocks, valid, scale):
    """One query block [B, qb, N, H] against all key blocks: online softmax, fp32 running max/sum/output.

    The running max is a constant to autodiff (the result does not depend on it), which keeps its
    gradient exact and cheap.
    """
    b, qb, n, _ = q.shape
    init = (jnp.full((b, n, qb), _MASKED, jnp.float32), jnp.zeros((b, n, qb), jnp.float32),
            jnp.zeros((b, n, qb, v_blocks.shape[-1]), jnp.float32))

    def step(carry, blocks):
        m, l, acc = carry
        k, v = blocks[:2]
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
        if len(blocks) == 3:
            logits = jnp.where(blocks[2], logits, _MASKED)
        m_new = lax.stop_gradient(jnp.maximum(m, logits.max(axis=-1)))
        p = jnp.exp(logits - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        l = l * rescale + p.sum(axis=-1)
        pv = jnp.einsum("bnqk,bknh->bnqh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (m_new, l, acc * rescale[..., None] + pv), None

    xs = (k_blocks, v_blocks) if valid is None else (k_blocks, v_blocks, valid)
    (_, l, acc), _ = lax.scan(step, init, xs)
    return jnp.swapaxes(acc / l[..., None], 1, 2).astype(v_blocks.dtype)
