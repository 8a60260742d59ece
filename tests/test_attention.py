"""The attention backends against dense attention: forward, gradient, the config switch and the memory win."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import config_lib, trainer
from jaxpref.models import attention, presets
from jaxpref.models import unet as unet_lib
from jaxpref.models import pipeline as pipeline_lib
from jaxpref.models.unet import BasicTransformerBlock
import attention_oracle as oracle

# (queries, keys, heads, head dim, query block, key block): SD1.5's head dims 40/80/160, SDXL's 64,
# cross-attention on 77 text tokens, token counts that no block divides.
CASES = [
    (300, 300, 2, 40, 128, 64),    # self-attention, neither count a multiple of its block
    (96, 77, 2, 160, 32, 32),      # cross-attention, 77 keys in 3 blocks (the last padded)
    (130, 77, 3, 80, 64, 128),     # cross-attention, all 77 keys in one block, queries padded
    (64, 64, 2, 64, 512, 1024),    # one block each (blocks larger than the sequence)
]


def _qkv(t, s, n, h, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(key, (2, length, n, h), jnp.float32).astype(dtype)
                 for key, length in zip(keys, (t, s, s)))


@pytest.mark.parametrize("t,s,n,h,qb,kb", CASES)
def test_chunked_equals_dense_forward_and_gradient(t, s, n, h, qb, kb):
    q, k, v = _qkv(t, s, n, h)
    chunked = jax.jit(lambda q, k, v: attention.chunked_attention(q, k, v, qb, kb))
    out = chunked(q, k, v)
    assert out.shape == (2, t, n, h) and out.dtype == jnp.float32
    assert oracle.rel(out, oracle.dense(q, k, v)) < 1e-5
    for got, want in zip(oracle.grads(chunked, q, k, v), oracle.grads(oracle.dense, q, k, v)):
        assert oracle.rel(got, want) < 1e-5


def test_chunked_in_bfloat16_keeps_fp32_softmax():
    q, k, v = _qkv(200, 77, 2, 40, jnp.bfloat16)
    out = attention.chunked_attention(q, k, v, 64, 32)
    assert out.dtype == jnp.bfloat16
    exact = oracle.dense(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert oracle.rel(out.astype(jnp.float32), exact) < 2e-2


@pytest.mark.parametrize("backend", ["xla", "chunked", "auto"])
def test_every_backend_equals_dense(backend):
    q, k, v = _qkv(40, 77, 2, 40)
    assert oracle.rel(jax.jit(attention.dot_product_attention, static_argnums=3)(q, k, v, backend), oracle.dense(q, k, v)) < 1e-5
    for got, want in zip(oracle.grads(lambda *a: attention.dot_product_attention(*a, backend), q, k, v),
                         oracle.grads(oracle.dense, q, k, v)):
        assert oracle.rel(got, want) < 1e-5


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_equals_dense_in_bfloat16():
    q, k, v = _qkv(256, 128, 2, 40, jnp.bfloat16)  # token counts cuDNN takes (multiples of 64)
    exact = oracle.dense(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert oracle.rel(attention.dot_product_attention(q, k, v, "cudnn").astype(jnp.float32), exact) < 2e-2


@pytest.mark.parametrize("t,s", [(96, 77), (130, 77), (64, 64)])
def test_padding_to_cudnns_multiple_keeps_the_function_and_its_gradient(t, s):
    """cudnn_padded's padding (text keys 77 -> 128, masked by their true count; queries to a multiple of 64,
    their rows dropped), run through XLA's implementation here: the unpadded attention, forward and gradient."""
    q, k, v = _qkv(t, s, 2, 40)
    padded = jax.jit(lambda *a: attention.padded_attention(*a, "xla"))
    assert oracle.rel(padded(q, k, v), oracle.dense(q, k, v)) < 1e-5
    for got, want in zip(oracle.grads(padded, q, k, v), oracle.grads(oracle.dense, q, k, v)):
        assert oracle.rel(got, want) < 1e-5


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_padded_cross_attention_equals_dense_in_bfloat16():
    q, k, v = _qkv(256, 77, 2, 40, jnp.bfloat16)  # SD's 77 text keys, which cuDNN takes only padded
    exact = oracle.dense(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert oracle.rel(attention.dot_product_attention(q, k, v, "cudnn_padded").astype(jnp.float32), exact) < 2e-2
    for got, want in zip(oracle.grads(lambda *a: attention.dot_product_attention(*a, "cudnn_padded"), q, k, v),
                         oracle.grads(oracle.dense, *(x.astype(jnp.float32) for x in (q, k, v)))):
        assert oracle.rel(got.astype(jnp.float32), want) < 5e-2


def test_auto_picks_by_platform_dtype_and_length():
    short = jnp.zeros((1, 64, 2, 40), jnp.bfloat16)
    long = jnp.zeros((1, 1024, 2, 40), jnp.bfloat16)
    assert attention.resolve("auto", short, short, "cpu") == "xla"
    assert attention.resolve("auto", long, long, "cpu") == "chunked"
    assert attention.resolve("auto", long, long, "tpu") == "pallas_tpu"
    assert attention.resolve("auto", short, short, "tpu") == "pallas_tpu"
    assert attention.resolve("auto", long, long, "gpu") == "cudnn"
    assert attention.resolve("auto", long.astype(jnp.float32), long, "gpu") == "chunked"  # cuDNN: bf16/fp16 only
    odd = jnp.zeros((1, 64, 2, 36), jnp.bfloat16)  # head dim not a multiple of 8
    assert attention.resolve("auto", odd, odd, "gpu") == "xla"
    assert attention.resolve("xla", long, long, "gpu") == "xla"
    # SD's cross-attention: 77 text keys, not a multiple of 64, which jax 0.11's cuDNN refuses under grad.
    text = jnp.zeros((1, 77, 2, 40), jnp.bfloat16)
    assert not attention.cudnn_supports(long, text)
    assert attention.resolve("auto", long, text, "gpu") == "xla"


def test_unknown_or_misplaced_backends_are_refused():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="supported"):
        attention.dot_product_attention(q, q, q, "flash")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            attention.dot_product_attention(q, q, q, "pallas_tpu")
        for backend in ("cudnn", "cudnn_padded"):
            with pytest.raises(ValueError, match="needs a GPU"):
                attention.dot_product_attention(q, q, q, backend)


def _config():
    c = config_lib.base_config()
    c.objective, c.batch_size = "dpo", 2
    return c


def test_config_validation_names_the_attention_key():
    c = _config()
    assert c.attention == "auto"
    c.attention = "flash"
    with pytest.raises(ValueError, match=r"config\.attention='flash'.*supported"):
        config_lib.validate(c, check_paths=False)
    c.attention = "pallas_tpu"  # valid: a CPU host compiles it for TPU (python -m jaxpref.aot)
    config_lib.validate(c, check_paths=False)
    c.attention, c.dtype = "cudnn", "float32"
    with pytest.raises(ValueError, match=r"config\.attention='cudnn'.*bfloat16"):
        config_lib.validate(c, check_paths=False)
    c.attention = "chunked"
    config_lib.validate(c, check_paths=False)


def test_the_config_reaches_the_trained_unet():
    pipeline = pipeline_lib.load_pipeline(pipeline_lib.resolve_model_path(pipeline_lib.EMBEDDED_TINY))
    c = _config()
    c.attention = "chunked"
    run = trainer.build_run(config_lib.validate(c, check_paths=False), pipeline)
    assert run.method.unet.attention_impl == "chunked"


def test_transformer_block_with_chunked_attention_matches_the_default(monkeypatch):
    """The UNet's attention block (self- and cross-attention) through the module field the config sets."""
    monkeypatch.setattr(attention, "Q_BLOCK", 24)  # 100 tokens: 5 query blocks, the last padded
    monkeypatch.setattr(attention, "KV_BLOCK", 40)  # keys: 3 blocks of the tokens, 2 of the 77 text tokens
    block = BasicTransformerBlock(heads=2, dim_head=40)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 100, 80)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
    params = jax.jit(block.init)(jax.random.PRNGKey(0), x, text)
    want = jax.jit(block.apply)(params, x, text)
    got = jax.jit(block.clone(attention_impl="chunked").apply)(params, x, text)
    assert oracle.rel(got, want) < 1e-5


@pytest.mark.compiled_for_few_runs
def test_chunked_lowers_compiled_temporaries():
    """One SD1.5 top-block self-attention (4096 tokens, head dim 40), compiled for this CPU, never run.

    Measured: 20.7x fewer temporaries forward (12.4 vs 256 MiB), 14.0x with the gradient (36.8 vs 513 MiB).
    """
    q = jax.ShapeDtypeStruct((1, 4096, 2, 40), jnp.float32)

    def temporaries(fn, grad):
        if grad:
            fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2))
        return jax.jit(fn).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    chunked = lambda q, k, v: attention.dot_product_attention(q, k, v, "chunked")  # noqa: E731
    assert temporaries(oracle.dense, False) >= 2 * 4096 * 4096 * 2 * 4  # fp32 logits and probabilities, 2 heads
    assert temporaries(oracle.dense, False) / temporaries(chunked, False) >= 10
    assert temporaries(oracle.dense, True) / temporaries(chunked, True) >= 5


@pytest.mark.compiled_for_few_runs
def test_chunked_lowers_an_sd15_shaped_unet_steps_temporaries_5x():
    """A reduced-depth SD1.5 UNet (SD1.5's first level at 64x64 latents: 4096 tokens, 8 heads of 40, 77 text
    tokens; one block per level, two levels) in bf16 with remat, the ε-MSE gradient the step takes at
    2 images, compiled for this CPU and never run: chunked attention needs >= 5x fewer temporaries than xla."""
    unet_config = {**presets.SD15_UNET, "block_out_channels": [320, 640], "layers_per_block": 1,
                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    latents = jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    text = jax.ShapeDtypeStruct((2, 77, 768), jnp.bfloat16)

    def temporaries(backend):
        unet = unet_lib.unet_from_config(unet_config, dtype=jnp.bfloat16, remat=True, attention_impl=backend)
        params = unet_lib.unet_param_shapes(unet)
        loss = lambda p, x, t, c: jnp.mean(unet.apply({"params": p}, x, t, c).astype(jnp.float32) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(params, latents, t, text).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries("xla") >= 5 * temporaries("chunked")
