"""The train step on a tiny random SD pipeline: gradients against a plain re-computation, accumulation,
clipping, non-finite skipping, and each objective lowering its loss on a fixed toy pair set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpref import config_lib, objectives, step as step_lib, trainer
from jaxpref.data.tokenizer import tokenize
from jaxpref.methods.base import pair_keys
from jaxpref.models import load_pipeline
import train_helpers as th
from tiny_sd import build_tiny_sd

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return load_pipeline(build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd"))))


def make_config(objective="dpo", **overrides):
    c = config_lib.base_config()
    c.objective = objective
    c.dtype = c.reference_dtype = "float32"
    c.batch_size, c.grad_accum = 4, 1
    c.prompt_dropout = 0.0
    c.data.resolution = 32  # tiny VAE: 4x down -> 8x8 latents
    c.optimizer.update(name="adamw", lr=1e-3, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    c.dro.update(buffer_size=4, num_inference_steps=4)
    return config_lib.validate(config_lib.apply_overrides(c, overrides, source="make_config"))


def make_batch(run, seed=0, num_pairs=4, pairs=True):
    rng = np.random.default_rng(seed)
    h, w, ch = run.latent_shape
    shape = (num_pairs, 2, h, w, ch) if pairs else (num_pairs, h, w, ch)
    words = ["the cat", "cat", "the", "a cat the cat"]
    batch = {
        "input_ids": tokenize(run.pipeline.tokenizer, [words[i % 4] for i in range(num_pairs)]),
        "latent_mean": rng.standard_normal(shape).astype(np.float32) * 4.0,
        "latent_std": np.full(shape, 0.1, np.float32),
    }
    if run.config.objective == "smpo":
        batch["rewards"] = rng.uniform(0.12, 0.28, (num_pairs, 2)).astype(np.float32)
    return batch


@pytest.fixture
def build(pipeline, compiled_steps):
    """build(objective, **overrides) -> (run, initial state, frozen, jitted step); tests with the same
    objective and overrides share one compiled step (the step is pure and the state is not donated)."""
    def built(objective="dpo", **overrides):
        key = ("test_step", id(pipeline), objective, tuple(sorted(overrides.items())))
        if key not in compiled_steps:
            compiled_steps[key] = fresh(objective, overrides)
        return compiled_steps[key]

    def fresh(objective, overrides):
        run = trainer.build_run(make_config(objective, **overrides), pipeline)
        state = step_lib.init_train_state(run.pipeline.unet_params, run.optimizer, run.config, run.method,
                                          text_shape=run.text_shape, latent_shape=run.latent_shape)
        return (run, state, trainer.frozen_params(run),
                jax.jit(step_lib.make_train_step(run.config, run.method, run.optimizer)))

    return built


# On the host in float64 (numpy): exact differences of float32 values, and no op-by-op compile per leaf shape.
def _host(t):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), t)


def _tree_diff(a, b):
    return jax.tree_util.tree_map(np.subtract, _host(a), _host(b))


def _tree_norm(t):
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(_host(t)))))


ADAM = {"optimizer.lr": 3e-3}  # AdamW, no clipping: shared by the NaN test and the loss-lowering runs
# SGD with lr 1 and the global-norm clip at CLIP: the update is the (clipped) gradient the step applied (shared by the
# tests that read it; the steps report the gradient's norm before the clip). CLIP lies between the norms of the
# gradients those tests take (measured: DPO's ~157, clipped; the soft-label SmPO step's ~16, not clipped), and
# updates that large keep params - update exact enough for a 1e-4 comparison in fp32.
CLIP = 50.0
SGD_LR1 = {"optimizer.name": "sgd", "optimizer.lr": 1.0, "sample_posterior": False, "dpo.beta": 500.0,
           "optimizer.grad_clip": CLIP}
# Compile levels (conftest, compiled_for_few_runs): the gradient test and the SmPO-is-DPO test keep the shipped
# level; at LLVM level 0 the step's policy and reference forwards round apart more (the loss at init 3.7e-5 from
# log 2 instead of 1.1e-5), past their 2e-5 bound. The others compile at level 0.
# DRO's reference (trajectory) form with a stale θ (refreshed every 1000 steps): from step 2 on the negatives'
# term gets a gradient (the loss-lowering run); at step 1 θ = φ (the buffer test).
DRO_STALE = {**ADAM, "dro.refresh_every": 1000, "dro.negative_target": "trajectory"}


def test_dpo_step_gradient_equals_plain_recomputation_and_the_clip_bounds_the_update(build):
    """SGD lr=1 exposes the update the step applied: the gradient recomputed by hand from docs/methods.md §0-1
    with diffusers' own alphas_cumprod (torch) for q_sample, clipped to global norm CLIP. One compiled step checks
    the gradient's value (the step's pre-clip grad_norm against the recomputed norm), its direction (the applied
    update rescaled) and the clip (the update's norm is exactly the clip: it was active)."""
    run, state, frozen, train_step = build("dpo", **SGD_LR1)
    batch = make_batch(run)
    rng = jax.random.PRNGKey(3)
    new_state, metrics = train_step(state, batch, rng, frozen)
    applied = _tree_diff(state.params, new_state.params)

    from diffusers import DDPMScheduler
    alphas = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.numpy()
    keys = pair_keys(rng, 4)
    t = np.asarray([jax.random.randint(jax.random.fold_in(k, 2), (), 0, 1000) for k in keys])
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 3), run.latent_shape)) for k in keys])
    scale = run.pipeline.vae.scaling_factor
    x0w, x0l = scale * batch["latent_mean"][:, 0], scale * batch["latent_mean"][:, 1]
    a = alphas[t][:, None, None, None]
    xw, xl = np.sqrt(a) * x0w + np.sqrt(1 - a) * eps, np.sqrt(a) * x0l + np.sqrt(1 - a) * eps
    text = jax.jit(run.pipeline.text_encoder.apply)({"params": run.pipeline.text_encoder_params}, batch["input_ids"])
    unet = run.pipeline.unet

    def mse(p, x):
        return jnp.mean((unet.apply({"params": p}, x, jnp.asarray(t), text) - eps) ** 2, axis=(1, 2, 3))

    def plain_loss(p, ref):  # ref an argument, not a closure constant: the same computation as p's
        inside = -0.5 * 500.0 * ((mse(p, xw) - mse(p, xl)) - (mse(ref, xw) - mse(ref, xl)))
        return -jnp.mean(jax.nn.log_sigmoid(inside))

    loss, grad = jax.jit(jax.value_and_grad(plain_loss))(run.pipeline.unet_params, run.pipeline.unet_params)
    # fp32: the step's policy and reference forwards and the plain ones round apart by ~1e-7 per error, which
    # β/2 = 250 turns into ~1e-5 on the loss (1.07e-5 relative between the two on jax 0.10, CPU); the
    # gradient below is the sharp check.
    assert float(metrics["loss"]) == pytest.approx(float(loss), abs=2e-5)
    assert float(metrics["loss"]) == pytest.approx(np.log(2), abs=2e-5)  # policy = reference at init
    norm = _tree_norm(grad)
    assert norm > 2 * CLIP, norm                                             # the clip is active
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)     # the gradient's size, before the clip
    assert _tree_norm(applied) == pytest.approx(CLIP, rel=1e-3)              # the update's size: the clip
    unclipped = jax.tree_util.tree_map(lambda u: u * (norm / CLIP), applied)  # its direction: the gradient's
    largest = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(_host(grad)))
    rel = th.tree_max_abs_diff(unclipped, grad) / largest
    assert rel <= 1e-4, rel


@pytest.mark.compiled_for_few_runs
def test_accumulated_step_equals_one_step_on_the_whole_batch(build):
    # A small β: the scanned micro-steps may round the policy and reference forwards differently (fp32,
    # ~1e-7 on Δθ − Δref), which the default β/2 = 2500 amplifies into a 1e-4 loss difference (seen on one CPU).
    # SGD: Adam's first step is lr·g/(|g| + ε), which turns rounding in near-zero gradients into lr-sized moves.
    overrides = {"dpo.beta": 2.0, "optimizer.name": "sgd"}
    run1, state1, frozen, step1 = build("dpo", batch_size=8, grad_accum=1, **overrides)
    _, state4, _, step4 = build("dpo", batch_size=8, grad_accum=4, **overrides)
    batch = make_batch(run1, num_pairs=8)
    rng = jax.random.PRNGKey(1)
    out1, m1 = step1(state1, batch, rng, frozen)
    out4, m4 = step4(state4, batch, rng, frozen)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    assert th.tree_max_abs_diff(out1.params, out4.params) <= 1e-5


def test_smpo_without_inversion_and_a_certain_label_is_a_dpo_step(build):
    """docs/methods.md §3: γ(2p − 1) = 1 is DPO. γ = 1 and a reward gap that saturates p to 1.0 (a tiny reward
    range), with inversion "none" (forward noise from the same per-pair keys): loss, gradient and update equal
    DPO's. Both steps are the gradient test's (SGD lr 1, global-norm clip CLIP), whose pre-clip grad_norm is
    checked there against the recomputed gradient."""
    smpo_overrides = {"smpo.beta": 500.0, "smpo.inversion": "none", "smpo.gamma": 1.0, "smpo.reward_min": 0.0,
                      "smpo.reward_max": 1e-3}
    run_d, state, frozen, dpo_step = build("dpo", **SGD_LR1)
    run_s, _, _, smpo_step = build("smpo", **SGD_LR1, **smpo_overrides)
    batch = make_batch(run_d)
    rewards = np.tile(np.asarray([[0.9, 0.2]], np.float32), (4, 1))   # r'_w − r'_l = 700: p = 1.0 in float32
    np.testing.assert_array_equal(np.asarray(objectives.smpo_preference(rewards[:, 0], rewards[:, 1], 0.0, 1e-3)), 1.0)
    rng = jax.random.PRNGKey(7)
    after_dpo, m_dpo = dpo_step(state, batch, rng, frozen)
    after_smpo, m_smpo = smpo_step(state, {**batch, "rewards": rewards}, rng, frozen)
    assert float(m_smpo["smoothing"]) == 1.0
    assert float(m_smpo["loss"]) == pytest.approx(float(m_dpo["loss"]), rel=1e-6)
    assert float(m_smpo["grad_norm"]) == pytest.approx(float(m_dpo["grad_norm"]), rel=1e-5)
    assert th.tree_max_abs_diff(after_dpo.params, after_smpo.params) <= 1e-6
    # With a soft label (p < 1) the same pairs give a smaller step: the margin is scaled by γ(2p − 1) < 1. Its
    # gradient is under the clip, so the step is the whole gradient, tanh(0.1) times DPO's (pre-clip) one.
    soft = np.tile(np.asarray([[0.0006, 0.0004]], np.float32), (4, 1))  # r' gap 0.2: γ(2p − 1) = tanh(0.1)
    after_soft, m_soft = smpo_step(state, {**batch, "rewards": soft}, rng, frozen)
    assert float(m_soft["smoothing"]) == pytest.approx(np.tanh(0.1), rel=1e-3)
    assert float(m_dpo["grad_norm"]) > CLIP > float(m_soft["grad_norm"])
    step_norm = lambda s: _tree_norm(_tree_diff(state.params, s.params))  # noqa: E731
    assert step_norm(after_soft) == pytest.approx(np.tanh(0.1) * float(m_dpo["grad_norm"]), rel=1e-3)


@pytest.mark.compiled_for_few_runs
def test_nan_batch_skips_the_update(build):
    run, state, frozen, train_step = build("dpo", **ADAM)
    batch = make_batch(run)
    batch["latent_mean"][1, 0, 0, 0, 0] = np.nan
    new_state, metrics = train_step(state, batch, jax.random.PRNGKey(0), frozen)
    assert float(metrics["update_skipped"]) == 1.0 and int(new_state.skipped) == 1
    assert th.tree_max_abs_diff(state.params, new_state.params) == 0.0
    assert th.tree_max_abs_diff(state.opt_state, new_state.opt_state) == 0.0
    assert int(new_state.step) == 1
    # A finite batch afterwards trains normally.
    newer, metrics = train_step(new_state, make_batch(run), jax.random.PRNGKey(1), frozen)
    assert float(metrics["update_skipped"]) == 0.0 and th.tree_max_abs_diff(newer.params, new_state.params) > 0


@pytest.mark.compiled_for_few_runs
def test_dro_step_fills_buffer_and_negatives_are_the_samplers_own_predictions(build):
    # The loss-lowering test's DRO config (one compile for both): at step 1 its stale sampler is θ itself.
    run, state, frozen, train_step = build("dro", **DRO_STALE)
    batch = make_batch(run, pairs=False)
    new_state, metrics = train_step(state, batch, jax.random.PRNGKey(0), frozen)
    buf = new_state.method_state.negatives
    assert int(buf.filled) == 4
    # Every stored ε is θ's (= the initial params') prediction at the stored (x_k, t_k, c).
    k = 2
    pred = jax.jit(run.pipeline.unet.apply)({"params": run.pipeline.unet_params}, buf.latents[:, k],
                                            buf.timesteps[:, k], buf.text)
    np.testing.assert_allclose(np.asarray(pred), np.asarray(buf.eps[:, k]), rtol=1e-4, atol=1e-5)
    # Perturbed grid: descending steps 50 apart... here 4 steps of 250 with one offset in [0, 250).
    ts = np.asarray(buf.timesteps)
    assert np.all(np.diff(ts, axis=1) == -250) and np.all((ts[:, -1] >= 0) & (ts[:, -1] < 250))
    # θ = φ: the policy's error on its own negatives is ~0, so the hinge is Le - (0 - err_ref) + m.
    assert float(metrics["negative_err"]) < 1e-8
    assert 0.0 <= float(metrics["active_hinge"]) <= 1.0 and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
@pytest.mark.compiled_for_few_runs
@pytest.mark.parametrize("objective", ["dpo", "smpo", "dro"])
def test_training_lowers_each_loss_on_a_fixed_pair_set(build, objective):
    overrides = DRO_STALE if objective == "dro" else dict(ADAM)
    run, state, frozen, train_step = build(objective, **overrides)
    batch = make_batch(run, seed=5, pairs=objective != "dro")
    losses = []
    for i in range(30):
        state, metrics = train_step(state, batch, jax.random.PRNGKey(i % 3), frozen)
        losses.append(float(metrics["loss"]))
    print(objective, "loss curve:", " ".join(f"{x:.4f}" for x in losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (objective, losses)
