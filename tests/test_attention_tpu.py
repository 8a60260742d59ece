"""The ``pallas_tpu`` attention backend on a CPU host: the wrapper's layout, padding and sharding with the
kernel swapped for dense attention, the real Pallas kernel through Pallas' TPU interpret mode, and the
UNet's attention block lowered for a TPU topology (the kernel's custom call, no dense logits)."""
import functools

import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import aot, sharding
from jaxpref.models import attention
from jaxpref.models.unet import BasicTransformerBlock
import attention_oracle as oracle

# (queries, keys, heads, head dim): SD1.5's head dims 40/80/160, SDXL's 64, 77 text keys, counts no 128 divides.
CASES = [(300, 300, 2, 40), (96, 77, 2, 160), (130, 77, 3, 80), (128, 128, 2, 64)]


def _qkv(t, s, n, h, batch=2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(key, (batch, length, n, h), jnp.float32) for key, length in zip(keys, (t, s, s)))


def _masked_dense_kernel(q, k, v, segment_ids, scale, seen=None):
    """The kernel's contract on [B, N, T, H] in float64-free plain jnp: softmax(q kᵀ scale, masked by
    segment ids) v. ``seen`` collects the shapes the kernel is called with."""
    if seen is not None:
        seen.append((q.shape, k.shape, None if segment_ids is None else segment_ids.kv.shape))
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k) * scale
    if segment_ids is not None:
        same = segment_ids.q[:, None, :, None] == segment_ids.kv[:, None, None, :]
        logits = jnp.where(same, logits, -jnp.inf)
    return jnp.einsum("bnqk,bnkh->bnqh", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("t,s,n,h", CASES)
def test_wrapper_layout_and_padding_equal_dense(t, s, n, h):
    """Head dim padded to 128 lanes, tokens to 128 (padded keys masked, padded queries dropped): exact."""
    q, k, v = _qkv(t, s, n, h)
    seen = []
    fn = jax.jit(lambda q, k, v: attention.pallas_tpu_attention(
        q, k, v, kernel=functools.partial(_masked_dense_kernel, seen=seen)))
    out = fn(q, k, v)
    padded = lambda x: -(-x // 128) * 128  # noqa: E731
    assert seen[0][:2] == ((2, n, padded(t), padded(h)), (2, n, padded(s), padded(h)))
    assert (seen[0][2] is None) == (s % 128 == 0)
    assert out.shape == (2, t, n, h)
    assert oracle.rel(out, oracle.dense(q, k, v)) < 1e-5
    for got, want in zip(oracle.grads(fn, q, k, v), oracle.grads(oracle.dense, q, k, v)):
        assert oracle.rel(got, want) < 1e-5


def test_the_pallas_kernel_in_interpret_mode_equals_dense():
    """The real TPU kernel (Pallas' TPU interpreter on CPU), cross-attention on 77 keys, head dim 40."""
    q, k, v = _qkv(100, 77, 2, 40, batch=1)
    fn = jax.jit(attention.pallas_tpu_attention)
    with pltpu.force_tpu_interpret_mode():
        out = fn(q, k, v)
        grads = oracle.grads(attention.pallas_tpu_attention, q, k, v)
    assert oracle.rel(out, oracle.dense(q, k, v)) < 1e-5
    for got, want in zip(grads, oracle.grads(oracle.dense, q, k, v)):
        assert oracle.rel(got, want) < 1e-4


@pytest.fixture(scope="module")
def v5e_mesh():
    """data=2 x fsdp=4 over the abstract devices of a v5e:2x4 (compile-only: nothing runs on them)."""
    return sharding.make_mesh(2, 4, devices=aot.topology_devices("v5e:2x4"))


def test_batch_is_split_over_the_mesh_batch_axes(v5e_mesh):
    """Inside shard_map each device's kernel sees its share of the batch and every head."""
    for batch, per_device in ((16, 2), (4, 2), (3, 3)):  # all 8 devices; data only (4 % 8); none divides
        seen = []
        kernel = functools.partial(_masked_dense_kernel, seen=seen)
        x = jax.ShapeDtypeStruct((batch, 256, 8, 40), jnp.bfloat16)
        with attention.use_mesh(v5e_mesh):
            jax.jit(lambda q, k, v: attention.pallas_tpu_attention(q, k, v, kernel=kernel)).trace(x, x, x)
        assert seen[0][0] == (per_device, 8, 256, 128)


def _sd15_block_hlo(mesh, backend):
    """SD1.5's top transformer block (64x64 latents: 4096 tokens, 320 channels, 8 heads of 40, 77 text
    tokens), forward and gradient, lowered for ``mesh`` with attention ``backend``."""
    block = BasicTransformerBlock(heads=8, dim_head=40, attention_impl=backend, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((8, 4096, 320), jnp.float32)
    text = jax.ShapeDtypeStruct((8, 77, 768), jnp.float32)
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, text)
    loss = lambda p, x, text: jnp.sum(block.apply(p, x, text).astype(jnp.float32) ** 2)  # noqa: E731
    with attention.use_mesh(mesh):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
        fn = jax.jit(jax.grad(loss), in_shardings=(sharding.replicated(mesh), rows, rows))
        return fn.lower(params, x, text).as_text()


def test_sd15_attention_on_a_tpu_topology_runs_the_pallas_kernel(v5e_mesh):
    """auto on a TPU mesh: the Pallas kernel's custom call, no [.., 4096, 4096] fp32 logits (xla has them)."""
    auto = _sd15_block_hlo(v5e_mesh, "auto")
    assert "tpu_custom_call" in auto
    assert "4096x4096" not in auto
    dense = _sd15_block_hlo(v5e_mesh, "xla")
    assert "tpu_custom_call" not in dense
    assert "4096x4096xf32" in dense


def test_auto_follows_the_mesh_platform(v5e_mesh):
    q = jnp.zeros((1, 64, 2, 40))
    assert attention.resolve("auto", q, q) == ("pallas_tpu" if jax.default_backend() == "tpu" else "xla")
    with attention.use_mesh(v5e_mesh):
        assert attention.target_platform() == "tpu"
        assert attention.resolve("auto", q, q) == "pallas_tpu"
    cpu = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    with attention.use_mesh(cpu):
        assert attention.resolve("auto", q, q) == "xla"
    np.testing.assert_equal(attention.target_platform(), jax.default_backend())


def _pallas_calls(jaxpr, manual=False):
    """(eqn, inside a shard_map) for every pallas_call in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn, manual
        inner = manual or eqn.primitive.name == "shard_map"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _pallas_calls(sub, inner)


def test_evaluation_generator_runs_the_kernel_on_each_devices_images(v5e_mesh, world):
    """Evaluation's generator (vmapped per image, outside the train step's use_mesh) on a v5e:2x4 mesh with
    ``pallas_tpu``: every kernel call sits inside the generator's shard_map and sees the device's 16 / 8 = 2
    images (x 2 for classifier-free guidance), not the whole batch replicated on every device."""
    from jaxpref import diffusion, evaluate
    from jaxpref.models import load_pipeline

    pipe = load_pipeline(world[0])
    unet = pipe.unet.clone(attention_impl="pallas_tpu")
    shape = evaluate.latent_shape(pipe, None, None)
    schedule = diffusion.NoiseSchedule.from_config(pipe.scheduler_config)
    fn = evaluate._generate_fn(unet, pipe.vae, schedule, "ddim", 2, 3.0, 0.0, shape, v5e_mesh)
    abstract = lambda tree: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    text = jax.ShapeDtypeStruct((16, 77, pipe.unet.cross_attention_dim), jnp.float32)
    traced = fn.trace(abstract(pipe.unet_params), abstract(pipe.vae_params), jax.ShapeDtypeStruct((16,), jnp.int32),
                      text, text)
    calls = list(_pallas_calls(traced.jaxpr.jaxpr))
    assert calls and all(manual for _, manual in calls)
    for eqn, _ in calls:
        q = eqn.invars[0].aval.shape  # [..., heads, tokens, head dim]: leading dims = this device's rows
        assert int(np.prod(q[:-3])) == 2 * 2, q
