"""Scaled dot-product attention behind one switch (``config.attention``).

Dense XLA attention materialises the fp32 logits, [B, N, T, S]: at SD1.5's 4096 tokens that is 64 MiB per
sample and head, kept again for the backward pass. The backends here compute the same function:

- ``xla``: ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in fp32);
- ``cudnn``: its cuDNN flash attention (GPU, bf16/fp16, head dim a multiple of 8, token counts multiples of
  64); a call it does not take (SD's cross-attention on 77 text keys) runs ``xla``: its logits are small;
- ``cudnn_padded``: cuDNN flash attention for every call, token counts it does not take zero-padded to
  the next multiple of 64 and masked by their true lengths (SD's 77 text keys -> 128, 51 masked): the
  cross-attention's fp32 logits and probabilities are never materialised (GPU only);
- ``chunked``: pure JAX, query blocks in ``lax.map``, key blocks in ``lax.scan`` with an online softmax and
  fp32 accumulation; each query block is rematerialised in the backward pass, so memory is
  O(block × tokens) forward and backward, on any platform;
- ``pallas_tpu``: Pallas' TPU flash attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``),
  run per device inside ``shard_map`` over the mesh's batch axes (heads unsharded). The kernel tiles the
  head dim and the token axes by 128 lanes, so the head dim is zero-padded to a multiple of 128 (SD1.5's
  40/80/160 -> 128/128/256, SDXL's 64 -> 128: exact, the scale stays 1/√H of the real dim) and the token
  axes to a multiple of 128 (padded queries' rows dropped, padded keys masked by segment ids: SD's 77
  text tokens are 128 keys, 51 masked);
- ``auto``: ``pallas_tpu`` on TPU; on GPU cuDNN where it supports the call, ``xla`` for cross-attention
  on text it does not take; otherwise ``chunked`` for long sequences, ``xla`` for short ones.

The platform (and, for ``pallas_tpu``, the mesh) is the one of ``use_mesh(mesh)`` while the step is traced
(``trainer.jit_train_step`` sets it: a TPU step compiled ahead of time on a CPU host is a TPU step), or of
``per_device(mesh)`` inside a ``shard_map`` body (evaluation's generator), else ``jax.default_backend()``.

Layout as ``jax.nn.dot_product_attention``: q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

BACKENDS = ("auto", "xla", "cudnn", "cudnn_padded", "chunked", "pallas_tpu")
BATCH_AXES = ("data", "fsdp")  # jaxpref.sharding's mesh axes (not imported: sharding imports the models)
TPU_LANES = 128  # the kernel's tile of the head dim and the token axes
_MESH = contextvars.ContextVar("attention_mesh", default=None)
_PLATFORM = contextvars.ContextVar("attention_platform", default=None)  # set by per_device

Q_BLOCK = 512
KV_BLOCK = 1024
# auto off cuDNN: dense below this many query x key pairs per head, chunked from it. Measured on XLA:CPU
# (8 heads of 40, fp32): up to 256 x 256 the two cost the same time and memory, so short sequences keep the
# dense numerics; at 1024 x 1024 chunked needs 13x less forward temporaries (5 vs 64 MiB) at equal speed, and
# at 4096 x 4096 21x less (50 vs 1024 MiB forward, 147 vs 2053 MiB with the gradient) and runs 2-3x faster.
CHUNKED_FROM = 512 * 512
TEXT_KEYS = 128  # at most this many keys: text conditioning, whose dense logits are small
CUDNN_TOKENS = 64  # cuDNN flash attention's multiple of the query and key counts (see cudnn_supports)
_MASKED = -1e30  # a finite -inf: masked logits and the empty running max stay NaN-free in the gradient


def check_backend(name: str) -> str:
    """``name`` if it is a backend; ValueError saying what exists otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported {BACKENDS}")
    return name


@contextlib.contextmanager
def use_mesh(mesh):
    """Trace attention for ``mesh``: its platform decides ``auto``, ``pallas_tpu`` shards over its batch axes."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


@contextlib.contextmanager
def per_device(mesh):
    """Trace the body of a ``shard_map`` over ``mesh``: ``auto`` follows the mesh's platform, and
    ``pallas_tpu`` runs the kernel on the device's own batch (no second shard_map)."""
    token = _MESH.set(None)
    platform = _PLATFORM.set(mesh.devices.flat[0].platform)
    try:
        yield mesh
    finally:
        _PLATFORM.reset(platform)
        _MESH.reset(token)


def target_platform() -> str:
    """The platform being traced for: ``use_mesh``'s (or ``per_device``'s) devices', else ``jax.default_backend()``."""
    mesh = _MESH.get()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return _PLATFORM.get() or jax.default_backend()


def resolve(backend: str, q, k, platform: str | None = None) -> str:
    """The concrete backend ``backend`` means for this call (``auto`` decides by platform, dtype and size)."""
    check_backend(backend)
    if backend != "auto":
        return backend
    platform = platform or target_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda"):
        if cudnn_supports(q, k):
            return "cudnn"
        if k.shape[1] <= TEXT_KEYS:  # cross-attention on text: as the cudnn backend runs it
            return "xla"
    return "chunked" if q.shape[1] * k.shape[1] >= CHUNKED_FROM else "xla"


def cudnn_supports(q, k) -> bool:
    """Whether cuDNN flash attention takes the call: an Ampere or newer GPU (compute capability 8.0; where the
    capability is unknown, assumed), bf16/fp16, head dim a multiple of 8 up to 128 (256 on Hopper+), token
    counts multiples of 64. The last is jax 0.11's rule for a differentiated call: it refused SD's
    cross-attention (4096 queries, 77 text keys) in the train step on an H200; jax 0.10 took it."""
    capability = _gpu_capability()
    if q.dtype not in (jnp.bfloat16, jnp.float16) or 0.0 < capability < 8.0:
        return False
    head_dim = q.shape[-1]
    return cudnn_token_counts(q, k) and head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def cudnn_token_counts(q, k) -> bool:
    """Whether the query and key counts are multiples of cuDNN flash attention's 64."""
    return q.shape[1] % CUDNN_TOKENS == 0 and k.shape[1] % CUDNN_TOKENS == 0


def _gpu_capability() -> float:
    """The compute capability of the GPU traced for: ``use_mesh``'s (a step compiled for a GPU target on
    another host), else the local one's."""
    mesh = _MESH.get()
    try:
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        return float(getattr(device, "compute_capability", 0.0))
    except (ValueError, RuntimeError):
        return 0.0


def dot_product_attention(q, k, v, backend: str = "xla"):
    """softmax(q kᵀ / √H) v by ``backend`` (one of ``BACKENDS``)."""
    backend = resolve(backend, q, k)
    if backend == "chunked":
        return chunked_attention(q, k, v, Q_BLOCK, KV_BLOCK)
    if backend == "pallas_tpu":
        if target_platform() != "tpu":
            raise ValueError(f"attention backend 'pallas_tpu' needs a TPU, this step is traced for "
                             f"{target_platform()!r}; use 'auto', 'chunked' or 'xla'")
        return pallas_tpu_attention(q, k, v)
    if backend in ("cudnn", "cudnn_padded"):
        if target_platform() not in ("gpu", "cuda"):
            raise ValueError(f"attention backend {backend!r} needs a GPU, this process runs on "
                             f"{target_platform()!r}; use 'auto', 'chunked' or 'xla'")
        if backend == "cudnn_padded":
            return padded_attention(q, k, v, "cudnn")
        if not cudnn_token_counts(q, k):  # cross-attention on 77 text tokens: small logits, dense is cheap
            backend = "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=backend)


def padded_attention(q, k, v, implementation: str, multiple: int = CUDNN_TOKENS):
    """``jax.nn.dot_product_attention`` with query and key counts zero-padded to ``multiple``: padded keys
    are masked by the true key count (``key_value_seq_lengths``), padded queries' rows dropped."""
    t, s = q.shape[1], k.shape[1]
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x  # noqa: E731
    q_pad, kv_pad = -t % multiple, -s % multiple
    if not q_pad and not kv_pad:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    lengths = dict(query_seq_lengths=jnp.full((q.shape[0],), t, jnp.int32) if q_pad else None,
                   key_value_seq_lengths=jnp.full((q.shape[0],), s, jnp.int32) if kv_pad else None)
    out = jax.nn.dot_product_attention(pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), implementation=implementation,
                                       **lengths)
    return out[:, :t]


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


def pallas_tpu_attention(q, k, v, kernel=None):
    """Pallas TPU flash attention, per device over ``use_mesh``'s batch axes (whole batch without a mesh).

    ``kernel(q, k, v, segment_ids, scale)`` on [B, N, T, H] (default: the Pallas kernel; tests pass dense
    attention to check the layout, padding and sharding on CPU). The batch is split over the longest
    prefix of (data, fsdp) whose size divides it; a batch no split divides runs whole on every device.
    """
    kernel = kernel or _tpu_flash_kernel
    attend = functools.partial(_padded_attention, kernel=kernel, scale=q.shape[-1] ** -0.5)
    mesh = _MESH.get()
    axes = _batch_axes(mesh, q.shape[0]) if mesh is not None else ()
    if not axes:
        return attend(q, k, v)
    spec = P(axes)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _batch_axes(mesh, batch: int) -> tuple:
    """The longest prefix of the mesh's batch axes (size > 1) whose product divides ``batch``."""
    axes, size = [], 1
    for name in (a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1):
        if batch % (size * mesh.shape[name]):
            break
        axes.append(name)
        size *= mesh.shape[name]
    return tuple(axes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_attention(q, k, v, kernel, scale):
    """[B, T, N, H] -> the kernel's [B, N, T', H'] with T', S', H' multiples of 128 -> [B, T, N, H]."""
    b, t, _, h = q.shape
    s = k.shape[1]
    tp, sp, hp = _round_up(t, TPU_LANES), _round_up(s, TPU_LANES), _round_up(h, TPU_LANES)

    def layout(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
        return jnp.swapaxes(x, 1, 2)

    segment_ids = None
    if sp != s:  # padded keys: segment 0, every query and real key: segment 1
        tpu_flash = _tpu_flash_module()
        segment_ids = tpu_flash.SegmentIds(q=jnp.ones((b, tp), jnp.int32),
                                           kv=jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp)))
    out = kernel(layout(q, tp), layout(k, sp), layout(v, sp), segment_ids, scale)
    return jnp.swapaxes(out, 1, 2)[:, :t, :, :h]


def _block(length: int) -> int:
    """The largest of 512/256/128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def _tpu_flash_module():
    """Pallas' TPU flash attention, imported when a TPU program needs it: the other backends do not
    depend on an experimental module's presence in the installed jax."""
    from jax.experimental.pallas.ops.tpu import flash_attention
    return flash_attention


def _tpu_flash_kernel(q, k, v, segment_ids, scale):
    tpu_flash = _tpu_flash_module()
    bq, bk = _block(q.shape[2]), _block(k.shape[2])
    blocks = tpu_flash.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                                  block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                                  block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    return tpu_flash.flash_attention(q, k, v, segment_ids=segment_ids, sm_scale=scale, block_sizes=blocks)
