"""DDIM inversion, ReNoise and SmPO's inversion: diffusers, round trips, float64 transcriptions, masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler

from jaxpref.diffusion import (NoiseRegularization, NoiseSchedule, autocorrelation_loss, invert, patch_kl_loss,
                               regularize_noise, sample, smpo_grid, smpo_invert, smpo_landing_timestep)

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading"}
SCHEDULE = NoiseSchedule.from_config(SD15)
B, H, W, C = 2, 8, 8, 4
MIX = np.random.RandomState(0).randn(C, C) * 0.6


def model_np(x, t, cond, strength=1.0):
    """float64 numpy twin of ``model_jax``; ``strength`` scales the x-dependent (non-linear) part."""
    t = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    return strength * (np.tanh(x @ MIX + cond[:, None, None, :]) * 0.8 + 0.15 * x) + 0.3 * np.sin(t / 150.0)


def model_jax(x, t, cond, strength=1.0):
    t = t.astype(jnp.float32)[:, None, None, None]
    mixed = jnp.tanh(x @ jnp.asarray(MIX, jnp.float32) + cond[:, None, None, :]) * 0.8 + 0.15 * x
    return strength * mixed + 0.3 * jnp.sin(t / 150.0)


def inputs(seed=0, batch=B):
    rng = np.random.RandomState(seed)
    return rng.randn(batch, H, W, C).astype(np.float32), rng.randn(batch, C).astype(np.float32)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def round_trip_error(model, x0, cond, num_steps, **kw):
    """max |DDIM-sample(invert(x0)) − x0| / max |x0|."""
    def run(x, c):
        x_T = invert(model, x, SCHEDULE, num_steps=num_steps, cond=c, **kw)
        return sample(model, x_T, SCHEDULE, sampler="ddim", num_steps=num_steps, cond=c)
    return rel_err(jax.jit(run)(x0, cond), x0)


def test_invert_matches_diffusers_ddim_inverse_scheduler():
    x0, cond = inputs()
    theirs = DDIMInverseScheduler.from_config(SD15)
    theirs.set_timesteps(50)
    x, ref = torch.tensor(x0, dtype=torch.float64), []
    for t in theirs.timesteps:
        x = theirs.step(torch.tensor(model_np(x.numpy(), np.full(B, int(t)), cond)), t, x).prev_sample
        ref.append(x.numpy())
    x_T, traj = jax.jit(lambda x, c: invert(model_jax, x, SCHEDULE, num_steps=50, cond=c,
                                            return_trajectory=True))(x0, cond)
    np.testing.assert_array_equal(traj.timesteps[:, 0], theirs.timesteps.numpy())
    for k in range(50):
        assert rel_err(traj.latents[k], ref[k]) <= 1e-5, k
    assert rel_err(x_T, ref[-1]) <= 1e-5


def linear_model(scale):
    """ε(x, t) = scale · x M + 0.3 sin(t/150): linear in x."""
    mix = jnp.asarray(MIX, jnp.float32)
    return lambda x, t, c: scale * (x @ mix) + 0.3 * jnp.sin(t.astype(jnp.float32) / 150.0)[:, None, None, None]


def test_invert_then_sample_reconstructs():
    """50 steps. x-independent ε: exact (<= 1e-5). Linear ε: plain DDIM inversion errs in proportion to
    the x-dependence (<= 4e-4 at scale 0.001, <= 4e-2 at 0.1); ReNoise with K = 5 is exact (<= 1e-5)."""
    x0, cond = inputs(1)
    err_const = round_trip_error(linear_model(0.0), x0, cond, 50)
    err_small, err_large = (round_trip_error(linear_model(s), x0, cond, 50) for s in (0.001, 0.1))
    err_renoise = round_trip_error(linear_model(0.1), x0, cond, 50, renoise_steps=5)
    print(f"round trip: x-independent {err_const:.2e}; linear 0.001 {err_small:.2e}, 0.1 {err_large:.2e}; "
          f"linear 0.1 with K=5 {err_renoise:.2e}")
    assert err_const <= 1e-5 and err_small <= 4e-4 and err_large <= 4e-2 and err_renoise <= 1e-5


def test_renoise_iterations_lower_reconstruction_error():
    x0, cond = inputs(2)
    errors = {k: round_trip_error(model_jax, x0, cond, 10, renoise_steps=k) for k in (0, 1, 3, 6)}
    averaged = round_trip_error(model_jax, x0, cond, 10, renoise_steps=6, average_window=(3, 7))
    print("reconstruction error by renoise_steps:", {k: f"{v:.2e}" for k, v in errors.items()},
          f"K=6 averaged over [3, 7): {averaged:.2e}")
    assert errors[1] < errors[0] and errors[3] < errors[1] and errors[6] < errors[3]
    assert averaged < errors[0]


def test_renoise_is_a_fixed_point_of_ddim_sampling():
    """With many iterations each inversion step solves x_t = inv(x_s, ε(x_t, t)), which one DDIM step undoes."""
    x0, cond = inputs(3)
    assert round_trip_error(model_jax, x0, cond, 10, renoise_steps=30) <= 1e-4


def test_patch_kl_loss_matches_numpy_transcription():
    rng = np.random.RandomState(4)
    e, ref = rng.randn(H, W, C), 0.5 + 2 * rng.randn(H, W, C)
    patches = lambda x: x.reshape(H // 4, 4, W // 4, 4, C).transpose(0, 2, 4, 1, 3).reshape(-1, 16)
    pe, pr = patches(e), patches(ref)
    v0, v1 = pe.var(axis=1, ddof=1), pr.var(axis=1, ddof=1)
    kl = np.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (pe.mean(1) - pr.mean(1)) ** 2) / (v1 + 1e-6) - 1
    np.testing.assert_allclose(patch_kl_loss(jnp.asarray(e, jnp.float32), jnp.asarray(ref, jnp.float32)),
                               np.abs(kl).sum(), rtol=1e-5)
    assert float(patch_kl_loss(jnp.asarray(e), jnp.asarray(e))) == pytest.approx(0.0, abs=1e-4)


def test_autocorrelation_loss_matches_numpy_transcription():
    rng = np.random.RandomState(5)
    e = rng.randn(16, 16, 2)
    key = jax.random.key(6)
    expected = 0.0
    for c in range(2):
        n, level = e[..., c], 0
        while True:
            r = int(jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, c), level), (), 0, n.shape[0] // 2))
            expected += np.mean(n * np.roll(n, r, 0)) ** 2 + np.mean(n * np.roll(n, r, 1)) ** 2
            if n.shape[0] <= 8:
                break
            n = n.reshape(n.shape[0] // 2, 2, n.shape[1] // 2, 2).mean(axis=(1, 3))
            level += 1
    np.testing.assert_allclose(autocorrelation_loss(jnp.asarray(e, jnp.float32), key), expected, rtol=1e-5)


def test_regularize_noise_pulls_towards_gaussian_statistics():
    rng = np.random.RandomState(7)
    smooth = np.cumsum(rng.randn(B, H, W, C), axis=1) / 3.0  # strongly autocorrelated along rows
    ref = rng.randn(B, H, W, C)
    config = NoiseRegularization(lambda_kl=0.01, lambda_ac=5.0)
    keys = jax.random.split(jax.random.key(8), B)
    out = np.asarray(regularize_noise(jnp.asarray(smooth, jnp.float32), jnp.asarray(ref, jnp.float32), keys, config))
    lag1 = lambda x: np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x * x)
    assert np.isfinite(out).all() and lag1(out) < lag1(smooth)


def test_paper_shifts_leave_gaussian_noise_gaussian_where_code_shifts_shrink_it():
    """Pure N(0, 1) noise on 8x8 latents (the embedded world's) against an independent reference: the formula's
    rolls (δ >= 1, ``min_shift=1``) only decorrelate, so the variance stays near 1; the released code's rolls
    include δ = 0 in a quarter of the draws, whose gradient 4·mean(ε²)·ε/(H·W) pulls the variance towards 0.
    Every roll the formula's form draws is in 1..H/2."""
    noise = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    ref = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
    keys = jax.random.split(jax.random.key(2), 8)
    variance = {shift: float(jnp.mean(regularize_noise(noise, ref, keys, NoiseRegularization(min_shift=shift)) ** 2))
                for shift in (0, 1)}
    assert 0.8 < variance[1] < 1.2 and variance[0] < 0.5, variance
    e = np.asarray(noise[0, ..., :1], np.float64)
    for k in range(50):  # the loss at one channel and one level is one roll's: find which
        got = float(autocorrelation_loss(jnp.asarray(e, jnp.float32), jax.random.key(k), min_shift=1))
        want = {r: np.mean(e * np.roll(e, r, 0)) ** 2 + np.mean(e * np.roll(e, r, 1)) ** 2 for r in range(8)}
        matched = min(want, key=lambda r: abs(want[r] - got))
        assert min(matched, 8 - matched) in range(1, 5)  # a roll by r and by H - r correlate the same pairs


def test_invert_with_noise_regularization_is_per_sample():
    x0, cond = inputs(9, batch=3)
    run = jax.jit(lambda x, c: invert(model_jax, x, SCHEDULE, num_steps=5, cond=c, renoise_steps=2,
                                      average_window=(1, 3), noise_regularization=NoiseRegularization(),
                                      rng=jax.random.key(10)))
    batched = np.asarray(run(x0, cond))
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched[:1], np.asarray(run(x0[:1], cond[:1])), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rng"):
        invert(model_jax, x0, SCHEDULE, num_steps=5, cond=cond, noise_regularization=NoiseRegularization())


# ---------------------------------------------------------------------------------------------
# SmPO (docs/methods.md §3).

T_SMPO = np.array([0, 1, 2, 150, 200, 201, 202, 600, 601, 602, 801, 802, 999], np.int32)


def smpo_reference(x0, t, cond, mode):
    """float64 loop transcription of JaydenLyh/SmPO train.py's inversion (diffusers 0.20 DDIMInverse),
    and of the paper-clean form (clean level ᾱ = 1, model at each step's target, landing on t)."""
    ac = SCHEDULE.alphas_cumprod_np.astype(np.float64)
    clean = ac[0] if mode == "code" else 1.0  # code: initial_alpha_cumprod (set_alpha_to_one false)
    alpha = lambda s: ac[s] if s >= 0 else clean
    inv = lambda x, e, s, s2: np.sqrt(alpha(s2)) * (x - np.sqrt(1 - alpha(s)) * e) / np.sqrt(alpha(s)) \
        + np.sqrt(1 - alpha(s2)) * e
    latents, targets = [], []
    for b in range(x0.shape[0]):
        x, tb, c = x0[b:b + 1].astype(np.float64), int(t[b]), cond[b:b + 1]
        if mode == "code":
            steps = [(s, s + 200, s) for s in (-199, 1, 201, 401, 601) if s < tb]  # (from, to, model's t)
        else:
            steps, cur = [], -1
            for g in (1, 201, 401, 601, 801, 1001):
                if cur < tb:
                    steps.append((cur, min(g, tb), min(g, tb)))
                    cur = min(g, tb)
        for s, s2, t_model in steps:
            e1 = model_np(x, [t_model], c)
            e2 = model_np(inv(x, e1, s, s2), [t_model], c)
            x = inv(x, (e1 + e2) / 2, s, s2)
        latents.append(x[0])
        targets.append((x[0] - np.sqrt(ac[tb]) * x0[b]) / np.sqrt(1 - ac[tb]))
    return np.stack(latents), np.stack(targets)


def test_smpo_grid_and_landing_levels():
    np.testing.assert_array_equal(smpo_grid(SCHEDULE, 5), [-199, 1, 201, 401, 601])
    np.testing.assert_array_equal(smpo_grid(SCHEDULE, 10), np.arange(-99, 802, 100))  # SDXL's 10 steps
    landing = smpo_landing_timestep(jnp.asarray(T_SMPO), SCHEDULE)
    np.testing.assert_array_equal(landing, [1, 1, 201, 201, 201, 201, 401, 601, 601, 801, 801, 801, 801])
    np.testing.assert_array_equal(smpo_landing_timestep(jnp.asarray(T_SMPO), SCHEDULE, mode="paper"), T_SMPO)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_smpo_invert_matches_float64_transcription(mode):
    x0, cond = inputs(11, batch=len(T_SMPO))
    ours = jax.jit(lambda x, t, c: smpo_invert(model_jax, x, t, SCHEDULE, cond=c, mode=mode))(x0, T_SMPO, cond)
    latents, targets = smpo_reference(x0, T_SMPO, cond, mode)
    for b in range(len(T_SMPO)):
        assert rel_err(ours.latents[b], latents[b]) <= 1e-5, (mode, T_SMPO[b])
        assert rel_err(ours.target[b], targets[b]) <= 1e-4, (mode, T_SMPO[b])
    # τ is the noise that q_sample at the sampled t maps x0 to x̃ with.
    np.testing.assert_allclose(SCHEDULE.q_sample(jnp.asarray(x0), T_SMPO, ours.target), ours.latents, atol=1e-5)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_smpo_batch_with_different_t_equals_each_sample_alone(mode):
    x0, cond = inputs(12, batch=5)
    t = np.array([999, 0, 450, 201, 202], np.int32)
    run = jax.jit(lambda x, t, c: smpo_invert(model_jax, x, t, SCHEDULE, cond=c, mode=mode))
    batched = run(x0, t, cond)
    for b in range(5):
        alone = run(x0[b:b + 1], t[b:b + 1], cond[b:b + 1])
        np.testing.assert_allclose(batched.latents[b:b + 1], alone.latents, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batched.target[b:b + 1], alone.target, rtol=1e-6, atol=1e-5)


def test_smpo_and_invert_compile_once_per_shape():
    traces = []

    def counted(x, t, c):
        traces.append(1)
        return model_jax(x, t, c)

    smpo = jax.jit(lambda x, t, c: smpo_invert(counted, x, t, SCHEDULE, cond=c))
    inv = jax.jit(lambda x, c: invert(counted, x, SCHEDULE, num_steps=10, cond=c, renoise_steps=2,
                                      average_window=(0, 3)))
    x0, cond = inputs(13)
    smpo(x0, np.array([5, 700], np.int32), cond)
    inv(x0, cond)
    after_first = len(traces)
    for seed in (14, 15):
        x0, cond = inputs(seed)
        smpo(x0, np.array([999, 3], np.int32), cond)
        inv(x0, cond)
    assert len(traces) == after_first and smpo._cache_size() == 1 and inv._cache_size() == 1


def test_smpo_bad_mode_raises():
    x0, cond = inputs()
    with pytest.raises(ValueError, match="mode.*'code', 'paper'"):
        smpo_invert(model_jax, x0, np.array([1, 2]), SCHEDULE, cond=cond, mode="exact")
