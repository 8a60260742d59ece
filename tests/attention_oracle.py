"""Dense attention, the oracle the attention backends (tests/test_attention*.py) are compared against, and
the comparison itself. The oracle and the gradients run compiled, each as one program: op by op, every op of
every shape the tests use would compile on its own."""
import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def grads(fn, q, k, v):
    """d/d(q, k, v) of a loss that weighs every output element differently."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), (0, 1, 2)))(q, k, v)


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64 on the host."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
