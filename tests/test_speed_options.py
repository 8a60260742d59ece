"""The speed options of the methods (issue: method-level speedups), each against what it must preserve:

- ``smpo.inversion_chunks``: the inversion of rows ordered by the steps they need, chunk by chunk, gives the
  whole-batch inversion's latents (<= 1e-5, fp32) with fewer model calls, counted at run time through a
  wrapped eps function; one row per chunk calls the model exactly as often as SmPO's grid says each row needs;
  on a batch split over devices the chunks stay on their devices (nothing gathered); the FLOP model the
  run's MFU divides by counts the rows the inversion runs (an expectation over t, against counted calls).
- ``dro.steps_per_trajectory = k``: a micro-step samples B/k trajectories and trains k distinct recorded steps
  of each; k = 1 picks as the reference code does (one step of each of B distinct trajectories).
- ``lora.fuse_reference_forward``: policy and reference errors from one batched call equal the two calls'.
- ``remat_policy``: every policy's gradient equals the plain UNet's.
"""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import config_lib, lora
from jaxpref.diffusion import NoiseSchedule, smpo_invert
from jaxpref.methods.base import Method, pair_keys
from jaxpref.methods.dro import DRO, empty_negatives_buffer
from jaxpref.methods.smpo import SmPO, inversion_rows
from jaxpref.models import unet as unet_lib
from jaxpref.models.presets import BENCH_TINY_UNET, SD15_SCHEDULER
import train_helpers as th

pytestmark = pytest.mark.compiled_for_few_runs  # programs compiled to run once or twice (conftest)

SCHEDULE = NoiseSchedule.from_config(SD15_SCHEDULER)
SHAPE = (8, 8, 4)
# SD1.5's SmPO grids (docs/methods.md §3), written out: "code" runs step j for t > source j; "paper" runs
# its first step always and step j >= 1 for t > target j − 1 (targets 1, 201, ..., 801, then 1001).
CODE_SOURCES = np.array([-199, 1, 201, 401, 601])
PAPER_TARGETS = np.array([1, 201, 401, 601, 801, 1001])


def steps_needed(mode, t):
    """Inversion steps each row needs [B], from the grids above (numpy)."""
    t = np.asarray(t)[:, None]
    if mode == "code":
        return np.sum(CODE_SOURCES[None, :] < t, axis=1)
    return 1 + np.sum(PAPER_TARGETS[None, :-1] < t, axis=1)


class RowCounter:
    """Wraps an eps function; counts at run time (``jax.debug.callback``: a ``lax.cond`` branch not taken
    does not call it) the rows it was called on."""

    def __init__(self):
        self.rows = 0

    def wrap(self, eps_fn):
        def counted(x, t, cond):
            jax.debug.callback(self._add, x.shape[0])
            return eps_fn(x, t, cond)
        return counted

    def _add(self, n):
        self.rows += int(n)


def toy_eps(x, t, cond):
    """A smooth ε-model that reads its row's x, t and caption: a wrong row order shows in the result."""
    a = SCHEDULE.alpha_cumprod_at(t)[:, None, None, None]
    caption = jnp.tanh(jnp.mean(cond, axis=(1, 2)))[:, None, None, None]
    return jnp.sqrt(1.0 - a) * x / (a * 0.25 + 1.0 - a) + 0.1 * caption


def pairs_batch(num_pairs, seed=0):
    """(x0 [2B], t [2B], cond [2B, 4, 8]): winners then losers, one t per pair as SmPO draws it."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 1000, num_pairs)
    t[:2] = (999, 0)  # the first and last grid steps are both needed by some row
    x0 = rng.standard_normal((2 * num_pairs, *SHAPE)).astype(np.float32)
    cond = rng.standard_normal((2 * num_pairs, 4, 8)).astype(np.float32)
    return x0, np.tile(t, 2).astype(np.int32), cond


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_chunked_inversion_equals_the_whole_batch_with_fewer_model_calls(mode):
    x0, t, cond = pairs_batch(12)
    rows, steps = len(t), len(CODE_SOURCES) + (mode == "paper")
    results, counts = {}, {}
    for chunks, groups in ((1, 1), (24, 1), (4, 1), (2, 3)):
        counter = RowCounter()
        invert = jax.jit(lambda x, t, c: smpo_invert(counter.wrap(toy_eps), x, t, SCHEDULE, cond=c, mode=mode,
                                                     chunks=chunks, row_groups=groups))
        results[chunks, groups] = invert(x0, t, cond)
        jax.effects_barrier()
        counts[chunks, groups] = counter.rows
    whole = results[1, 1]
    for key, inv in results.items():
        np.testing.assert_allclose(inv.latents, whole.latents, rtol=0, atol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(inv.target, whole.target, rtol=0, atol=1e-5, err_msg=str(key))
        np.testing.assert_array_equal(inv.timestep, t)
    # Two predictions per step (SmPO's one ReNoise iteration). The whole batch runs every step; one row per
    # chunk runs exactly the steps its t needs; coarser chunks lie in between.
    assert counts[1, 1] == 2 * steps * rows
    assert counts[24, 1] == 2 * int(np.sum(steps_needed(mode, t)))
    assert counts[24, 1] < counts[4, 1] < counts[1, 1] and counts[24, 1] <= counts[2, 3] < counts[1, 1]
    print(mode, "model rows per inversion (chunks, groups):", counts)


@pytest.mark.parametrize("mode,chunks,groups", [("code", 1, 1), ("code", 4, 1), ("code", 2, 2), ("code", 2, 4), ("paper", 4, 1),
                                                 ("consistent", 1, 1)])
def test_flop_model_counts_the_inversion_rows_that_run(mode, chunks, groups):
    """SmPO's FLOP model (the MFU's numerator) against the rows the inversion calls the model on, counted at
    run time over 300 batches of 8 pairs with t uniform: the model is an expectation, so within 3 %."""
    config = config_lib.base_config()
    config.objective = "smpo"
    config.smpo.update(inversion=mode, inversion_chunks=chunks)
    rng = np.random.default_rng(0)
    counter = RowCounter()
    invert = jax.jit(lambda x, t, c: smpo_invert(counter.wrap(toy_eps), x, t, SCHEDULE, cond=c, mode=mode,
                                                 chunks=chunks, row_groups=groups,
                                                 renoise_steps=config.smpo.inversion_iterations).latents)
    x0, _, cond = pairs_batch(8)
    draws = 300
    for _ in range(draws):
        invert(x0, np.tile(rng.integers(0, 1000, 8), 2).astype(np.int32), cond)
    jax.effects_barrier()
    counted = counter.rows / draws
    if groups == 1 and jax.device_count() == 1:
        modelled = SmPO.flops(config, 8, fwd=1.0, fwdbwd=0.0)["inversion"]
    else:  # rows split in blocks (a device's share each): given here, as the step would on that many devices
        modelled = 2 * inversion_rows(config.smpo, 8, groups=groups)
    print(mode, chunks, groups, "rows counted per batch", counted, "modelled", modelled)
    assert abs(counted - modelled) <= 0.03 * modelled


SPLIT_OVER_DEVICES = """
import re, sys
import jax, numpy as np
from jaxpref import sharding
from jaxpref.diffusion import smpo_invert
from test_speed_options import SCHEDULE, pairs_batch, toy_eps
mesh = sharding.make_mesh(data=4, fsdp=1)
args = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in pairs_batch(8)]
out = {}
for chunks, groups in ((1, 1), (2, 4)):
    invert = jax.jit(lambda x, t, c: smpo_invert(toy_eps, x, t, SCHEDULE, cond=c, mode="code", chunks=chunks,
                                                 row_groups=groups).latents)
    compiled = invert.lower(*args).compile()
    moves = re.findall(r"all-gather|all-to-all|collective-permute", compiled.as_text())
    out[chunks] = np.asarray(compiled(*args))
    print(chunks, groups, sorted(set(moves)))
    assert not moves, (chunks, groups, moves)
np.testing.assert_allclose(out[2], out[1], rtol=0, atol=1e-5)
"""


def test_chunks_of_a_batch_split_over_devices_stay_on_their_devices():
    """Row groups = devices: rows are ordered and chunked within each device's share, so the compiled
    inversion of a batch split over 4 devices gathers and moves nothing (4 simulated CPU devices)."""
    out = subprocess.run([sys.executable, "-c", SPLIT_OVER_DEVICES], env=th.subprocess_env(num_devices=4),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


def test_chunks_config_is_checked_before_anything_runs():
    c = config_lib.base_config()
    c.objective, c.batch_size, c.smpo.inversion = "smpo", 4, "code"
    c.smpo.inversion_chunks = 8  # the 4 pairs' 8 images, one per chunk
    config_lib.validate(c, check_paths=False)
    for value, inversion, match in ((3, "code", r"must divide the micro-batch's 8 images"),
                                    (0, "code", r">= 1"),
                                    (2, "consistent", r"applies to smpo\.inversion='code' or 'paper'")):
        c.smpo.inversion, c.smpo.inversion_chunks = inversion, value
        with pytest.raises(ValueError, match=rf"config\.smpo\.inversion_chunks={value}: .*{match}"):
            config_lib.validate(c, check_paths=False)


@functools.lru_cache(maxsize=None)
def tiny_unet():
    """A small random Flax UNet (the benchmarks' tiny size): 8x8 latents, captions [B, 8, 32]."""
    unet = unet_lib.unet_from_config(BENCH_TINY_UNET, source="test")
    params = jax.jit(unet.init)(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1, 8, 32)))["params"]
    return unet, params


def test_smpo_method_inverts_in_chunks_with_the_unet():
    """SmPO.invert with smpo.inversion_chunks on a random UNet (convolutions and attention over a smaller
    batch): the same latents as the whole batch to 1e-5, fewer UNet rows, counted through its eps_fn."""
    unet, params = tiny_unet()
    x0, t, _ = pairs_batch(4, seed=1)
    text = np.random.default_rng(2).standard_normal((8, 8, 32)).astype(np.float32)
    keys = pair_keys(jax.random.PRNGKey(0), 4)
    results, counts = {}, {}
    for chunks in (1, 8):
        c = config_lib.base_config()
        c.objective, c.batch_size, c.dtype = "smpo", 4, "float32"
        c.smpo.update(inversion="code", inversion_chunks=chunks)
        method = SmPO(config_lib.validate(c, check_paths=False), unet=unet, schedule=SCHEDULE)
        counter = RowCounter()
        method.eps_fn = lambda p, method=method, counter=counter: counter.wrap(SmPO.eps_fn(method, p))
        results[chunks] = jax.jit(method.invert)(params, keys, x0, t, text)
        jax.effects_barrier()
        counts[chunks] = counter.rows
    np.testing.assert_allclose(results[8].latents, results[1].latents, rtol=0, atol=1e-5)
    np.testing.assert_allclose(results[8].target, results[1].target, rtol=0, atol=1e-5)
    assert counts[1] == 2 * 5 * 8
    assert counts[8] == 2 * int(np.sum(steps_needed("code", t))) < counts[1]


# ---------------------------------------------------------------------------------------------
# DRO: trajectory reuse.

NUM_STEPS = 4  # sampler steps per trajectory


def dro_method(unet, k, buffer_size):
    c = config_lib.base_config()
    c.objective, c.batch_size, c.dtype, c.reference_dtype = "dro", 4, "float32", "float32"
    c.dro.update(num_inference_steps=NUM_STEPS, steps_per_trajectory=k, buffer_size=buffer_size)
    return DRO(config_lib.validate(c, check_paths=False), unet=unet, schedule=SCHEDULE)


def expert_inputs(seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4, 8, 32)).astype(np.float32),          # captions
            4.0 * rng.standard_normal((4, *SHAPE)).astype(np.float32))   # experts


def micro_step_negatives(method, params):
    """One micro-step's refill and pick, as ``DRO.loss`` runs them (jitted)."""
    def run(buffer, text, x0, rng):
        keys = pair_keys(rng, 4)
        buffer = method.refill_negatives(buffer, params, {}, text, x0, keys, jax.random.fold_in(rng, 1))
        return buffer, method.pick_negatives(buffer, jax.random.fold_in(rng, 2), keys)
    return jax.jit(run)


def row_and_step(buffer, neg, i):
    """Which buffer row and recorded step pair i's negative came from (its expert and its timestep)."""
    row = int(np.flatnonzero(np.all(np.asarray(buffer.x0) == np.asarray(neg.x0[i]), axis=(1, 2, 3)))[0])
    step = int(np.flatnonzero(np.asarray(buffer.timesteps[row]) == int(neg.timesteps[i]))[0])
    return row, step


def test_dro_trains_k_distinct_steps_of_each_trajectory_before_sampling_again():
    """k = 2, 4 pairs, a buffer of 2: each micro-step writes 2 new trajectories (its first 2 prompts and
    experts) over the old ones and trains 2 distinct recorded steps of each, then samples again."""
    unet, params = tiny_unet()
    method = dro_method(unet, k=2, buffer_size=2)
    step = micro_step_negatives(method, params)
    buffer = empty_negatives_buffer(2, (8, 32), SHAPE, NUM_STEPS)
    previous = None
    for micro in range(2):
        text, x0 = expert_inputs(micro)
        buffer, neg = step(buffer, text, x0, jax.random.PRNGKey(micro))
        assert int(buffer.filled) == 2 and int(buffer.cursor) == 0
        np.testing.assert_array_equal(buffer.text, text[:2])   # the micro-step's first B/k prompts ...
        np.testing.assert_array_equal(buffer.x0, x0[:2])       # ... and their experts
        if previous is not None:  # sampled again: both rows are new trajectories
            assert not np.any(np.isclose(np.asarray(buffer.latents[:, -1]), np.asarray(previous.latents[:, -1])))
        picks = [row_and_step(buffer, neg, i) for i in range(4)]
        assert picks[0][0] == picks[1][0] and picks[2][0] == picks[3][0]   # k consecutive pairs share a row
        assert {picks[0][0], picks[2][0]} == {0, 1}                        # every new trajectory is trained
        assert picks[0][1] != picks[1][1] and picks[2][1] != picks[3][1]   # on k distinct steps
        for i, (row, s) in enumerate(picks):
            np.testing.assert_array_equal(neg.latents[i], buffer.latents[row, s])
            np.testing.assert_array_equal(neg.eps[i], buffer.eps[row, s])
            np.testing.assert_array_equal(neg.final[i], buffer.final[row])
            np.testing.assert_array_equal(neg.text[i], buffer.text[row])
        previous = buffer


def test_dro_one_step_per_trajectory_picks_as_the_reference_code():
    """k = 1: B trajectories written, each pair one step of its own distinct row; bit-identical to the pick
    written without the k path (distinct valid rows by random priority, one uniformly drawn step each)."""
    unet, params = tiny_unet()
    method = dro_method(unet, k=1, buffer_size=6)
    step = micro_step_negatives(method, params)
    text, x0 = expert_inputs(0)
    rng = jax.random.PRNGKey(7)
    buffer, neg = step(empty_negatives_buffer(6, (8, 32), SHAPE, NUM_STEPS), text, x0, rng)
    assert int(buffer.filled) == 4 and int(buffer.cursor) == 4
    np.testing.assert_array_equal(buffer.x0[:4], x0)
    k_rows, k_steps = jax.random.split(jax.random.fold_in(rng, 2))
    priority = jax.random.uniform(k_rows, (6,)) + (jnp.arange(6) < 4)
    rows = np.asarray(jax.lax.top_k(priority, 4)[1])
    steps = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, NUM_STEPS)[0])(jax.random.split(k_steps, 4)))
    assert len(set(rows.tolist())) == 4 and np.all(rows < 4)
    np.testing.assert_array_equal(neg.timesteps, np.asarray(buffer.timesteps)[rows, steps])
    np.testing.assert_array_equal(neg.latents, np.asarray(buffer.latents)[rows, steps])
    np.testing.assert_array_equal(neg.eps, np.asarray(buffer.eps)[rows, steps])
    np.testing.assert_array_equal(neg.x0, np.asarray(buffer.x0)[rows])
    np.testing.assert_array_equal(neg.final, np.asarray(buffer.final)[rows])


# ---------------------------------------------------------------------------------------------
# LoRA: policy and reference in one call; remat policies.

def lora_policy(params, dropout=0.1):
    c = config_lib.base_config()
    c.lora.update(enabled=True, rank=2, alpha=2.0, dropout=dropout)
    adapters = lora.init_adapters(jax.random.PRNGKey(1), params, c.lora)
    adapters = jax.tree_util.tree_map(  # B != 0: the policy differs from its base
        lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), adapters)
    return c, adapters


def test_fused_reference_forward_equals_two_calls():
    unet, params = tiny_unet()
    c, adapters = lora_policy(params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    t = np.array([3, 250, 600, 999], np.int32)
    text = rng.standard_normal((4, 8, 32)).astype(np.float32)
    target = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    out = {}
    for fused in (False, True):
        c.lora.fuse_reference_forward = fused
        method = Method(c, unet=unet, schedule=SCHEDULE)

        def loss(adapters):
            policy = lora.policy(adapters, params, c.lora, jax.random.PRNGKey(3))
            err, ref_err = method.errors(policy, params, x, t, text, target)
            return jnp.sum(err - 2.0 * ref_err), (err, ref_err)

        out[fused] = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
    (_, (err, ref_err)), grad = out[False]
    (_, (err_f, ref_err_f)), grad_f = out[True]
    assert float(jnp.max(jnp.abs(err - ref_err))) > 1e-4  # the policy is not its base
    np.testing.assert_allclose(err_f, err, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref_err_f, ref_err, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grad_f), jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fuse_reference_forward_needs_lora():
    c = config_lib.base_config()
    c.lora.fuse_reference_forward = True
    with pytest.raises(ValueError, match=r"config\.lora\.fuse_reference_forward=True: applies with lora\.enabled"):
        config_lib.validate(c, check_paths=False)


def test_conv_saving_remat_policy_keeps_the_gradient_and_saves_convs_and_projections():
    """Remat changes what the backward pass recomputes, never the gradient (the plain UNet's is the oracle);
    the policy saves convolutions and weight matmuls, not attention's batched matmuls."""
    name = "convs_and_projections_saveable"
    unet, params = tiny_unet()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    t, text = np.array([10, 900], np.int32), rng.standard_normal((2, 8, 32)).astype(np.float32)

    def grad(module):
        loss = lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x, t, text)))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grad(unet.clone(remat=True, remat_policy=name))),
                    jax.tree_util.tree_leaves(grad(unet))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    saved = []
    policy = unet_lib.REMAT_POLICIES[name]

    def record(fn, *args):
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        for eqn in jaxpr.eqns:
            saved.append((eqn.primitive.name, policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)))

    record(lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
           jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)))
    record(lambda a, w: a @ w, jnp.zeros((2, 5, 3)), jnp.zeros((3, 4)))                        # a projection
    record(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k), jnp.zeros((2, 5, 3)), jnp.zeros((2, 6, 3)))  # logits
    assert saved == [("conv_general_dilated", True), ("dot_general", True), ("dot_general", False)]
