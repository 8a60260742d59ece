"""SmPO's "consistent" inversion (docs/methods.md §3) against a closed-form oracle: for Gaussian data
x0 ~ N(0, diag(s²)) the optimal ε-prediction at level t is, per dimension,

    ε*(x_t) = √(1−ᾱ_t) · x_t / (ᾱ_t s² + 1 − ᾱ_t),

and the probability-flow ODE maps x0 to x_t = x0 · √(ᾱ_t s² + 1 − ᾱ_t)/s exactly, so an inversion can be
checked against the forward-noise error of the same ideal model and against the exact latent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import config_lib, step as step_lib, trainer
from jaxpref.data.tokenizer import tokenize
from jaxpref.diffusion import (NoiseRegularization, NoiseSchedule, SmPOInversion, invert, smpo_consistent_levels,
                               smpo_invert, smpo_landing_timestep)
from jaxpref.methods.base import INVERTED, NOISE, POSTERIOR, TIMESTEP, draw, pair_keys
from jaxpref.methods.smpo import INVERSIONS, SmPO, T_BUCKETS as SMPO_T_BUCKETS
from jaxpref.models import load_pipeline
from tiny_sd import build_tiny_sd

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading"}
SCHEDULE = NoiseSchedule.from_config(SD15)
ALPHAS = SCHEDULE.alphas_cumprod_np.astype(np.float64)
SHAPE = (8, 8, 4)
# Per-dimension data scales, log-uniform over two decades: real latents mix coarse and fine structure.
SCALES = np.exp(np.linspace(np.log(0.03), np.log(3.0), np.prod(SHAPE))).reshape(SHAPE).astype(np.float32)
T_GRID = np.array([2, 10, 50, 100, 200, 201, 300, 400, 500, 601, 700, 800, 900, 999], np.int32)
PER_T = 16


def gaussian_eps(scales=SCALES):
    """The optimal ε-prediction for x0 ~ N(0, diag(scales²)) (cond ignored)."""
    def eps_fn(x, t, cond):
        a = SCHEDULE.alpha_cumprod_at(t)[:, None, None, None]
        return jnp.sqrt(1.0 - a) * x / (a * scales ** 2 + 1.0 - a)
    return eps_fn


def gaussian_data(seed=0, scales=SCALES):
    """(x0, t, ε): PER_T samples of each t in T_GRID."""
    rng = np.random.RandomState(seed)
    t = np.repeat(T_GRID, PER_T)
    x0 = (scales * rng.randn(len(t), *SHAPE)).astype(np.float32)
    return x0, t, rng.randn(len(t), *SHAPE).astype(np.float32)


def per_t(values):
    return np.asarray(values, np.float64).reshape(len(T_GRID), PER_T).mean(axis=1)


def mse(a, b):
    return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))


def run_inversion(mode, x0, t, eps_fn=None, **kw):
    eps_fn = eps_fn or gaussian_eps()
    return jax.jit(lambda x, t: smpo_invert(eps_fn, x, t, SCHEDULE, cond=None, mode=mode, **kw))(x0, t)


def test_consistent_error_against_tau_is_within_a_small_factor_of_the_forward_noise_error():
    """At every t the ideal model's error on (x̃, t) against τ is at most 1.5x its error on a forward-noised
    x_t against ε (measured <= 0.7x; the exact ODE latent gives E τ² x, <= 1). The released code's form,
    evaluated at t with its latent at the grid level L(t) >= t, breaks this by 20x at t = 2."""
    x0, t, eps = gaussian_data()
    eps_fn = gaussian_eps()
    forward = per_t(mse(eps_fn(SCHEDULE.q_sample(jnp.asarray(x0), t, jnp.asarray(eps)), t, None), eps))
    ratios, tau_sq = {}, {}
    for mode in ("code", "paper", "consistent"):
        inv = run_inversion(mode, x0, t)
        np.testing.assert_array_equal(inv.timestep, t)
        ratios[mode] = per_t(mse(eps_fn(inv.latents, inv.timestep, None), inv.target)) / forward
        tau_sq[mode] = per_t(np.mean(np.asarray(inv.target, np.float64) ** 2, axis=(1, 2, 3)))
    a = ALPHAS[t][:, None, None, None]
    exact = x0 * np.sqrt(a * SCALES ** 2 + 1 - a) / SCALES
    tau_sq["exact ODE"] = per_t(np.mean(((exact - np.sqrt(a) * x0) / np.sqrt(1 - a)) ** 2, axis=(1, 2, 3)))
    print("t:", T_GRID.tolist())
    for name, v in tau_sq.items():
        print(f"mean τ² {name:10s}", np.round(v, 3).tolist())
    for name, v in ratios.items():
        print(f"err/forward err {name:10s}", np.round(v, 2).tolist())
    assert np.all(ratios["consistent"] <= 1.5), ratios["consistent"]
    assert ratios["code"].max() > 10.0  # the check sees the inconsistency it guards against


def test_consistent_latent_has_the_forward_marginals_variance():
    """The exact ODE latent is distributed as q(x_t): E x̃² = ᾱ s² + 1 − ᾱ per dimension. With the linear ε*
    every inversion here is linear in x0, x̃ = g · x0 per dimension, so inverting x0 = s gives the gain g and
    E x̃² = g² s² without sampling error. The consistent inversion stays within 10% of the marginal at every
    t; "paper" under-noises large t and "code" over-noises it."""
    x0 = np.broadcast_to(SCALES, (len(T_GRID), *SHAPE))
    a = ALPHAS[T_GRID][:, None, None, None]
    marginal = np.mean(a * SCALES ** 2 + 1 - a, axis=(1, 2, 3))
    ratio = {mode: np.mean(np.asarray(run_inversion(mode, x0, T_GRID).latents, np.float64) ** 2, axis=(1, 2, 3))
             / marginal for mode in ("code", "paper", "consistent")}
    print("t:", T_GRID.tolist(), "\nE x̃² / E x_t²:", {k: np.round(v, 2).tolist() for k, v in ratio.items()})
    assert np.all(np.abs(ratio["consistent"] - 1.0) <= 0.1), ratio["consistent"]
    assert ratio["paper"].min() < 0.9 and ratio["code"].max() > 1.2


def test_trained_timesteps_stay_spread_over_the_chain():
    """Over uniform t the policy is evaluated at >= 100 distinct timesteps, each where its latent sits;
    the code form's latents sit on 5 grid levels."""
    t = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (512,), 0, 1000), np.int32)
    x0 = np.zeros((512, 1, 1, 1), np.float32)  # the timesteps do not depend on the data
    inv = run_inversion("consistent", x0, t, eps_fn=gaussian_eps(np.float32(1.0)))
    assert len(np.unique(np.asarray(inv.timestep))) >= 100
    np.testing.assert_array_equal(inv.timestep, smpo_landing_timestep(t, SCHEDULE, mode="consistent"))
    assert len(np.unique(np.asarray(smpo_landing_timestep(t, SCHEDULE, mode="code")))) <= 5


def test_levels_run_from_clean_data_to_exactly_t():
    t = jnp.arange(1000, dtype=jnp.int32)
    levels = np.asarray(smpo_consistent_levels(t, 5))
    assert levels.shape == (6, 1000)
    np.testing.assert_array_equal(levels[0], -1)
    np.testing.assert_array_equal(levels[-1], np.arange(1000))
    assert np.all(np.diff(levels, axis=0) >= 0)
    assert np.all(np.diff(levels[:, 24:], axis=0) >= 1)  # distinct levels once t + 1 >= S²
    np.testing.assert_array_equal(levels[:, 999], [-1, 39, 159, 359, 639, 999])  # quadratic: short steps first


MIX = np.random.RandomState(0).randn(SHAPE[-1], SHAPE[-1]).astype(np.float32) * 0.6


def nonlinear_eps(x, t, cond):
    """A non-linear stand-in model whose output depends on x and t (unit-scale ε)."""
    return jnp.tanh(x @ MIX) * 0.8 + 0.15 * x + 0.3 * jnp.sin(t.astype(jnp.float32) / 150.0)[:, None, None, None]


def test_zero_iterations_is_plain_ddim_inversion():
    """K = 0 is ``invert`` (plain DDIM inversion, checked against diffusers in test_inversion.py) along the
    same per-sample grid, from clean data at ᾱ = 1 (a schedule with set_alpha_to_one)."""
    rng = np.random.RandomState(2)
    t = np.array([24, 100, 457, 999], np.int32)
    x0 = rng.randn(len(t), *SHAPE).astype(np.float32)
    ours = run_inversion("consistent", x0, t, eps_fn=nonlinear_eps, renoise_steps=0)
    grid = smpo_consistent_levels(jnp.asarray(t), 5)[1:][::-1].T  # [B, S] descending sampling grid
    clean_one = NoiseSchedule.from_config({**SD15, "set_alpha_to_one": True})
    theirs = jax.jit(lambda x, g: invert(nonlinear_eps, x, clean_one, num_steps=5, timesteps=g))(x0, grid)
    np.testing.assert_allclose(ours.latents, theirs, rtol=1e-5, atol=1e-5)
    # ReNoise iterations change the result (the model depends on x).
    assert np.abs(np.asarray(run_inversion("consistent", x0, t, eps_fn=nonlinear_eps).latents) - theirs).max() > 1e-3


def test_consistent_batch_with_different_t_equals_each_sample_alone():
    rng = np.random.RandomState(3)
    t = np.array([999, 0, 1, 2, 450, 23], np.int32)
    x0 = rng.randn(len(t), *SHAPE).astype(np.float32)
    keys = pair_keys(jax.random.PRNGKey(4), len(t))
    for reg in (None, NoiseRegularization()):
        run = jax.jit(lambda x, t, k: smpo_invert(nonlinear_eps, x, t, SCHEDULE, cond=None, mode="consistent",
                                                  noise_regularization=reg, keys=k))
        batched = run(x0, t, keys)
        assert np.isfinite(np.asarray(batched.latents)).all()
        for b in range(len(t)):
            alone = run(x0[b:b + 1], t[b:b + 1], keys[b:b + 1])
            np.testing.assert_allclose(batched.latents[b:b + 1], alone.latents, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(batched.target[b:b + 1], alone.target, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="keys"):
        smpo_invert(nonlinear_eps, x0, t, SCHEDULE, cond=None, mode="consistent",
                    noise_regularization=NoiseRegularization())


def test_config_validation_names_the_inversion_keys():
    assert "consistent" in INVERSIONS and "none" in INVERSIONS
    base = config_lib.base_config()
    assert (base.smpo.inversion, base.smpo.inversion_iterations, tuple(base.smpo.inversion_window)) == \
        ("code", 2, (0, 3))
    for key, value, message in [("inversion", "exact", r"config\.smpo\.inversion='exact'.*'consistent'"),
                                ("inversion_iterations", -1, r"config\.smpo\.inversion_iterations=-1"),
                                ("inversion_window", (1, 5), r"config\.smpo\.inversion_window=\(1, 5\)"),
                                ("inversion_window", (2, 2), r"config\.smpo\.inversion_window=\(2, 2\)")]:
        c = config_lib.base_config()
        c.objective, c.smpo.inversion = "smpo", "consistent"
        c.smpo[key] = value
        with pytest.raises(ValueError, match=message):
            config_lib.validate(c, check_paths=False)
    c = config_lib.base_config()
    c.objective, c.smpo.inversion_noise_regularization = "smpo", True  # with inversion "code"
    with pytest.raises(ValueError, match=r"config\.smpo\.inversion_noise_regularization.*'consistent'"):
        config_lib.validate(c, check_paths=False)


def test_a_fraction_of_the_pairs_is_inverted_the_others_forward_noised():
    """smpo.inversion_fraction: each pair (both its images) takes the inversion's (x̃, τ, t) or DPO's forward
    noise at its sampled t (x_t = √ᾱ x0 + √(1−ᾱ) ε, target ε), by its own uniform draw; 1 keeps the inversion."""
    c = config_lib.base_config()
    c.objective, c.smpo.inversion, c.smpo.inversion_fraction = "smpo", "consistent", 0.5
    method = SmPO(config_lib.validate(c, check_paths=False), schedule=SCHEDULE)
    b = 64
    keys = pair_keys(jax.random.PRNGKey(0), b)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2 * b, *SHAPE)).astype(np.float32)
    t = np.tile(rng.integers(0, 1000, b), 2).astype(np.int32)
    inverted = SmPOInversion(latents=jnp.full(x0.shape, 7.0), target=jnp.full(x0.shape, -7.0),
                             timestep=jnp.asarray(t + 1))
    x, tau, t_used = method.mix_forward_noise(keys, inverted, jnp.asarray(x0), jnp.asarray(t))
    use = np.asarray(draw(keys, INVERTED, lambda k: jax.random.uniform(k))) < 0.5
    use2 = np.concatenate([use, use])
    eps = np.asarray(draw(keys, NOISE, lambda k: jax.random.normal(k, SHAPE, jnp.float32)))
    eps2 = np.concatenate([eps, eps])
    a = ALPHAS[t][:, None, None, None]
    assert 0.3 < use.mean() < 0.7
    np.testing.assert_array_equal(np.asarray(x)[use2], 7.0)
    np.testing.assert_array_equal(np.asarray(tau)[use2], -7.0)
    np.testing.assert_array_equal(np.asarray(t_used), np.where(use2, t + 1, t))
    np.testing.assert_allclose(np.asarray(x)[~use2], (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps2)[~use2], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(tau)[~use2], eps2[~use2])
    c.smpo.inversion_fraction = 1.0
    assert SmPO(c, schedule=SCHEDULE).mix_forward_noise(keys, inverted, x0, t) is inverted
    c.smpo.inversion_fraction = 0.0
    with pytest.raises(ValueError, match=r"config\.smpo\.inversion_fraction=0\.0"):
        config_lib.validate(c, check_paths=False)


@pytest.mark.compiled_for_few_runs
def test_consistent_smpo_step_evaluates_the_policy_where_the_latent_is(tmp_path):
    """One SmPO step on the tiny random SD pipeline with inversion "consistent": the logged τ error is the
    policy's error at (x̃, t) against τ, re-computed here from the pairs' keys as the step draws them."""
    pipeline = load_pipeline(build_tiny_sd(str(tmp_path / "tiny_sd")))
    c = config_lib.base_config()
    c.objective, c.dtype, c.reference_dtype = "smpo", "float32", "float32"
    c.batch_size, c.prompt_dropout, c.data.resolution = 2, 0.0, 32
    c.optimizer.update(name="sgd", lr=1e-3, grad_clip=0.0, weight_decay=0.0)
    c.smpo.update(beta=1.0, inversion="consistent", inversion_noise_regularization=True)
    run = trainer.build_run(config_lib.validate(c, check_paths=False), pipeline)
    params = pipeline.unet_params
    state = step_lib.init_train_state(params, run.optimizer, c, run.method)
    rng = np.random.default_rng(0)
    shape = (2, 2, *run.latent_shape)
    batch = {"input_ids": tokenize(pipeline.tokenizer, ["the cat", "cat"]),
             "latent_mean": rng.standard_normal(shape).astype(np.float32) * 4.0,
             "latent_std": np.full(shape, 0.1, np.float32),
             "rewards": np.array([[0.25, 0.15], [0.2, 0.18]], np.float32)}
    key = jax.random.PRNGKey(5)
    _, metrics = jax.jit(step_lib.make_train_step(c, run.method, run.optimizer))(
        state, batch, key, trainer.frozen_params(run))
    assert float(metrics["loss"]) == pytest.approx(np.log(2), abs=1e-5)  # policy = reference

    keys = pair_keys(key, 2)
    scale = pipeline.vae.scaling_factor
    post = draw(keys, POSTERIOR, lambda k: jax.random.normal(k, shape[1:], jnp.float32))
    x0 = scale * (batch["latent_mean"] + batch["latent_std"] * np.asarray(post))
    t = np.asarray(draw(keys, TIMESTEP, lambda k: jax.random.randint(k, (), 0, 1000)))
    text = jax.jit(pipeline.text_encoder.apply)({"params": pipeline.text_encoder_params}, batch["input_ids"])
    unet_apply = jax.jit(pipeline.unet.apply)  # one compiled forward (op by op, each op compiles on its own)
    eps_fn = lambda x, t, cond: unet_apply({"params": params}, x, t, cond)
    noise_keys = np.asarray(draw(keys, NOISE, lambda k: k))
    stack = lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)])
    inv = jax.jit(lambda x0, t, text, k: smpo_invert(eps_fn, x0, t, run.schedule, cond=text, mode="consistent",
                                                     noise_regularization=NoiseRegularization(), keys=k))(
        stack(x0[:, 0], x0[:, 1]), stack(t, t), stack(text, text), stack(noise_keys, noise_keys))
    pred = eps_fn(inv.latents, inv.timestep, jnp.asarray(stack(text, text)))
    assert float(metrics["tau_err"]) == pytest.approx(float(jnp.mean((pred - inv.target) ** 2)), rel=1e-4)
    assert float(metrics["tau_sq"]) == pytest.approx(float(jnp.mean(inv.target ** 2)), rel=1e-4)

    # The diagnostics by t bucket (step 0 is a log step, so the forward-noise error is computed too).
    noise = np.asarray(draw(keys, NOISE, lambda k: jax.random.normal(k, shape[2:], jnp.float32)))
    t2, noise2 = stack(t, t), stack(noise, noise)
    x_t = run.schedule.q_sample(jnp.asarray(stack(x0[:, 0], x0[:, 1])), t2, jnp.asarray(noise2))
    noise_err = np.mean((np.asarray(eps_fn(x_t, t2, jnp.asarray(stack(text, text)))) - noise2) ** 2, axis=(1, 2, 3))
    tau_sq = np.mean(np.asarray(inv.target) ** 2, axis=(1, 2, 3))
    assert float(metrics["noise_err"]) == pytest.approx(noise_err.mean(), rel=1e-4)
    for lo, hi in zip(SMPO_T_BUCKETS, (*SMPO_T_BUCKETS[1:], 1000)):
        inside = (t2 >= lo) & (t2 < hi)
        if inside.any():
            assert float(metrics[f"tau_sq/t{lo}"]) == pytest.approx(tau_sq[inside].mean(), rel=1e-4)
            assert float(metrics[f"noise_err/t{lo}"]) == pytest.approx(noise_err[inside].mean(), rel=1e-4)
        else:
            assert np.isnan(float(metrics[f"tau_sq/t{lo}"]))


def test_inversion_model_picks_the_unet_that_inverts(tmp_path, monkeypatch):
    """``smpo.inversion_model``: "policy" inverts with the params being trained, "reference" with the frozen
    reference the loss compares against (traced only: the step's inversion receives that very pytree)."""
    pipeline = load_pipeline(build_tiny_sd(str(tmp_path / "tiny_sd")))
    inverted_with = []

    def forward_noise_instead(self, params, keys, x0_2, t2, text2):
        inverted_with.append(params)
        x_t, noise = self.noised_pairs(keys, x0_2, t2)
        return SmPOInversion(latents=x_t, target=noise, timestep=t2)

    monkeypatch.setattr(SmPO, "invert", forward_noise_instead)
    shape = (2, 2, 8, 8, 4)
    micro = {"input_ids": tokenize(pipeline.tokenizer, ["the cat", "cat"]),
             "latent_mean": np.zeros(shape, np.float32), "latent_std": np.ones(shape, np.float32),
             "rewards": np.array([[0.25, 0.15], [0.2, 0.18]], np.float32), "keys": pair_keys(jax.random.PRNGKey(0), 2)}
    for model in ("policy", "reference"):
        c = config_lib.base_config()
        c.objective, c.dtype, c.reference_dtype, c.batch_size, c.data.resolution = "smpo", "float32", "float32", 2, 32
        c.smpo.update(inversion="consistent", inversion_model=model)
        run = trainer.build_run(config_lib.validate(c, check_paths=False), pipeline)

        def loss(params, frozen):
            out = run.method.loss(params, frozen, micro, jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
            expected = params if model == "policy" else frozen["ref"]
            assert inverted_with[-1] is expected, model
            return out

        jax.eval_shape(loss, pipeline.unet_params, trainer.frozen_params(run))
    assert len(inverted_with) == 2
