"""DDIM / DDPM / DPM-Solver++ sampling against diffusers' PyTorch schedulers, step by step.

The same deterministic model drives both sides: a fixed channel-mixing map through tanh, plus a linear
term, a function of t and of the conditioning vector. The torch side runs in float64 (DPM-Solver's step
casts to float32 internally); ours in float32. Tolerance: 1e-5 relative (max-abs error over max-abs
value) at every step of the trajectory.
"""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from jaxpref.diffusion import NoiseSchedule, dro_timestep_grid, sample, sampler_noise
from jaxpref.models.presets import SD15_SCHEDULER

SD15 = {**SD15_SCHEDULER, "timestep_spacing": "leading"}
SD15_DPM = {k: v for k, v in SD15.items() if k != "timestep_spacing"}  # SD1.5 ships no spacing: DPM's linspace
RTOL = 1e-5
B, H, W, C = 2, 6, 6, 4
MIX = np.random.RandomState(0).randn(C, C) * 0.6


def model_np(x, t, cond):
    """float64 numpy twin of ``model_jax``. x: [B, H, W, C], t: [B], cond: [B, C]."""
    t = np.asarray(t, np.float64)[:, None, None, None]
    return np.tanh(x @ MIX + cond[:, None, None, :]) * 0.8 + 0.15 * x + 0.1 * np.sin(t / 150.0)


def model_jax(x, t, cond):
    t = t.astype(jnp.float32)[:, None, None, None]
    mixed = jnp.tanh(x @ jnp.asarray(MIX, jnp.float32) + cond[:, None, None, :])
    return mixed * 0.8 + 0.15 * x + 0.1 * jnp.sin(t / 150.0)


def inputs(seed=0, batch=B):
    rng = np.random.RandomState(seed)
    return (rng.randn(batch, H, W, C).astype(np.float32), rng.randn(batch, C).astype(np.float32),
            rng.randn(batch, C).astype(np.float32))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def torch_guided(x, t, cond, uncond, guidance):
    """The diffusers pipeline's CFG on numpy float64 (batch [uncond; cond], one call)."""
    tt = np.full(x.shape[0], int(t))
    if guidance == 1.0:
        return model_np(x, tt, cond)
    out = model_np(np.concatenate([x, x]), np.concatenate([tt, tt]), np.concatenate([uncond, cond]))
    out_u, out_c = np.split(out, 2)
    return out_u + guidance * (out_c - out_u)


def run_diffusers(scheduler, x_T, cond, uncond=None, guidance=1.0, dtype=torch.float64, step_kwargs=None):
    """Reference loop; returns the latent fed to the model at every step and the final sample."""
    x = torch.tensor(x_T, dtype=dtype)
    fed = []
    for k, t in enumerate(scheduler.timesteps):
        fed.append(x.numpy().astype(np.float64))
        out = torch.tensor(torch_guided(x.numpy().astype(np.float64), t, cond, uncond, guidance), dtype=dtype)
        kwargs = step_kwargs(k) if step_kwargs else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return np.stack(fed), x.numpy()


def run_ours(config, sampler, num_steps, x_T, cond, uncond=None, guidance=1.0, **kw):
    schedule = NoiseSchedule.from_config(config)
    fn = jax.jit(lambda x, c, u: sample(model_jax, x, schedule, sampler=sampler, num_steps=num_steps,
                                        guidance_scale=guidance, cond=c, uncond=u, return_trajectory=True, **kw))
    return fn(x_T, cond, uncond)


def assert_trajectory_close(ours, traj, fed, final):
    for k in range(fed.shape[0]):
        assert rel_err(traj.latents[k], fed[k]) <= RTOL, f"step {k}: {rel_err(traj.latents[k], fed[k]):.2e}"
    assert rel_err(ours, final) <= RTOL, f"final: {rel_err(ours, final):.2e}"


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddim_sd15_matches_diffusers(guidance):
    x_T, cond, uncond = inputs()
    theirs = DDIMScheduler.from_config(SD15)
    theirs.set_timesteps(50)
    fed, final = run_diffusers(theirs, x_T, cond, uncond, guidance)
    ours, traj = run_ours(SD15, "ddim", 50, x_T, cond, uncond, guidance)
    np.testing.assert_array_equal(traj.timesteps[:, 0], np.arange(981, 0, -20))
    assert_trajectory_close(ours, traj, fed, final)


@pytest.mark.parametrize("overrides,num_steps", [
    ({"prediction_type": "v_prediction"}, 50),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True}, 30),
    ({"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 25),
    ({"clip_sample": True, "clip_sample_range": 1.5}, 20),
])
def test_ddim_options_match_diffusers(overrides, num_steps):
    config = {**SD15, **overrides}
    x_T, cond, _ = inputs(1)
    theirs = DDIMScheduler.from_config(config)
    theirs.set_timesteps(num_steps)
    fed, final = run_diffusers(theirs, x_T, cond)
    ours, traj = run_ours(config, "ddim", num_steps, x_T, cond)
    assert_trajectory_close(ours, traj, fed, final)


def test_ddim_eta_matches_diffusers_with_shared_noise():
    x_T, cond, _ = inputs(2)
    rng = jax.random.key(3)
    noise = np.asarray(sampler_noise(rng, B, 25, (H, W, C)), np.float64)
    theirs = DDIMScheduler.from_config(SD15)
    theirs.set_timesteps(25)
    fed, final = run_diffusers(theirs, x_T, cond,
                               step_kwargs=lambda k: {"eta": 0.7, "variance_noise": torch.tensor(noise[k])})
    ours, traj = run_ours(SD15, "ddim", 25, x_T, cond, eta=0.7, rng=rng)
    assert_trajectory_close(ours, traj, fed, final)


@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_ddpm_matches_diffusers_with_shared_noise(overrides, monkeypatch):
    config = {**SD15, **overrides}
    x_T, cond, _ = inputs(4)
    rng = jax.random.key(5)
    noise = np.asarray(sampler_noise(rng, B, 50, (H, W, C)), np.float64)
    theirs = DDPMScheduler.from_config(config)
    theirs.set_timesteps(50)
    step = {"k": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, **_):
        return torch.tensor(noise[step["k"]], dtype=dtype)

    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", fake_randn)

    def count(k):
        step["k"] = k
        return {}

    fed, final = run_diffusers(theirs, x_T, cond, step_kwargs=count)
    ours, traj = run_ours(config, "ddpm", 50, x_T, cond, rng=rng)
    assert_trajectory_close(ours, traj, fed, final)


@pytest.mark.parametrize("overrides,num_steps,guidance", [
    ({}, 20, 1.0), ({}, 10, 5.0), ({"prediction_type": "v_prediction"}, 15, 1.0),
    ({"timestep_spacing": "leading"}, 20, 1.0),
])
def test_dpm_solver_pp_matches_diffusers(overrides, num_steps, guidance):
    config = {**SD15_DPM, **overrides}
    x_T, cond, uncond = inputs(6)
    theirs = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    theirs.set_timesteps(num_steps)
    fed, final = run_diffusers(theirs, x_T, cond, uncond, guidance, dtype=torch.float32)
    ours, traj = run_ours(config, "dpm++", num_steps, x_T, cond, uncond, guidance)
    np.testing.assert_array_equal(traj.timesteps[:, 0], theirs.timesteps.numpy())
    assert_trajectory_close(ours, traj, fed, final)


def test_dpm_per_sample_grids_use_each_samples_sigmas():
    """Each sample of a batch with two DRO grids equals diffusers run alone on that sample's timesteps."""
    x_T, cond, _ = inputs(7)
    grid = np.asarray(dro_timestep_grid(jax.random.key(0), B, 20, 1000))
    assert grid[0, -1] != grid[1, -1]
    schedule = NoiseSchedule.from_config(SD15_DPM)
    ours, traj = jax.jit(lambda x, c, g: sample(model_jax, x, schedule, sampler="dpm++", num_steps=20, cond=c,
                                                timesteps=g, return_trajectory=True))(x_T, cond, grid)
    np.testing.assert_array_equal(traj.timesteps.T, grid)
    for b in range(B):
        theirs = DPMSolverMultistepScheduler.from_config(SD15_DPM)
        theirs.set_timesteps(timesteps=grid[b].tolist())
        fed, final = run_diffusers(theirs, x_T[b:b + 1], cond[b:b + 1], dtype=torch.float32)
        assert_trajectory_close(ours[b:b + 1], traj._replace(latents=traj.latents[:, b:b + 1]), fed, final)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpm++", 0.0)])
def test_batch_with_different_grids_equals_each_sample_alone(sampler, eta):
    """Sample b alone (its noise key is then fold_in(rng, 0)) equals row 0 of a batch that puts b first
    among samples on other grids: no per-sample quantity (ᾱ, σ, λ, noise) leaks across the batch."""
    x_T, cond, _ = inputs(8, batch=3)
    grid = np.asarray(dro_timestep_grid(jax.random.key(1), 3, 20, 1000))
    assert len(set(grid[:, -1])) == 3
    schedule = NoiseSchedule.from_config(SD15)
    run = jax.jit(lambda x, c, g: sample(model_jax, x, schedule, sampler=sampler, num_steps=20, cond=c,
                                         timesteps=g, rng=jax.random.key(2), eta=eta))
    for b in range(3):
        order = [b] + [i for i in range(3) if i != b]
        batched = np.asarray(run(x_T[order], cond[order], grid[order]))
        alone = np.asarray(run(x_T[b:b + 1], cond[b:b + 1], grid[b:b + 1]))
        # XLA:CPU may vectorise a batch of 3 and of 1 differently: float32 summation order only (seen: 5e-6 abs
        # on outputs up to ~30); a sample mixed with another's grid or noise would be off by O(1).
        np.testing.assert_allclose(batched[:1], alone, rtol=1e-5, atol=2e-5)
        if eta == 0.0 and sampler != "ddpm":  # deterministic: b's position in the batch does not matter
            np.testing.assert_allclose(np.asarray(run(x_T, cond, grid))[b:b + 1], alone, rtol=1e-5, atol=2e-5)
    # A shared grid [S] is the same as that grid repeated per sample.
    np.testing.assert_array_equal(np.asarray(run(x_T, cond, grid[0])),
                                  np.asarray(run(x_T, cond, np.broadcast_to(grid[0], (3, 20)))))


def test_noise_of_a_sample_does_not_depend_on_batch_size():
    x_T, cond, _ = inputs(9, batch=4)
    schedule = NoiseSchedule.from_config(SD15)
    run = jax.jit(lambda x, c: sample(model_jax, x, schedule, sampler="ddpm", num_steps=10, cond=c,
                                      rng=jax.random.key(11)))
    np.testing.assert_allclose(np.asarray(run(x_T, cond))[:1], np.asarray(run(x_T[:1], cond[:1])), rtol=1e-5,
                               atol=2e-5)  # float32 summation order only (see above)
    noise = sampler_noise(jax.random.key(11), 4, 3, (H, W, C))
    np.testing.assert_array_equal(noise[:, :2], sampler_noise(jax.random.key(11), 2, 3, (H, W, C)))


def test_trajectory_records_fed_latent_and_guided_output():
    x_T, cond, uncond = inputs(10)
    schedule = NoiseSchedule.from_config(SD15)
    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return model_jax(x, t, c)

    ours, traj = jax.jit(lambda x, c, u: sample(counted, x, schedule, sampler="ddim", num_steps=5,
                                                guidance_scale=3.0, cond=c, uncond=u,
                                                return_trajectory=True))(x_T, cond, uncond)
    assert calls == [2 * B]  # one traced call per step on the [uncond; cond] batch
    assert traj.timesteps.shape == (5, B) and traj.latents.shape == traj.eps.shape == (5, B, H, W, C)
    np.testing.assert_array_equal(traj.latents[0], x_T)
    for k in range(5):
        t = traj.timesteps[k]
        u, c = model_jax(traj.latents[k], t, uncond), model_jax(traj.latents[k], t, cond)
        np.testing.assert_allclose(traj.eps[k], u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_dro_timestep_grid():
    grid = np.asarray(dro_timestep_grid(jax.random.key(0), 4096, 20, 1000))
    assert grid.shape == (4096, 20) and grid.dtype == np.int32
    offset = grid[:, -1]
    np.testing.assert_array_equal(grid - offset[:, None], np.broadcast_to(np.arange(950, -1, -50), (4096, 20)))
    assert offset.min() == 0 and offset.max() == 49
    assert len(np.unique(grid)) == 1000  # every t in 0..999 is reachable


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_one_compile_per_shape(sampler):
    schedule = NoiseSchedule.from_config(SD15)
    traces = []

    def counted(x, t, c):
        traces.append(1)
        return model_jax(x, t, c)

    run = jax.jit(lambda x, c, u, g: sample(counted, x, schedule, sampler=sampler, num_steps=20, guidance_scale=7.5,
                                            cond=c, uncond=u, timesteps=g, return_trajectory=True))
    for seed in range(3):
        x_T, cond, uncond = inputs(seed)
        run(x_T, cond, uncond, dro_timestep_grid(jax.random.key(seed), B, 20, 1000))
    assert len(traces) == 1 and run._cache_size() == 1


def test_bad_inputs_raise():
    x_T, cond, _ = inputs()
    schedule = NoiseSchedule.from_config(SD15)
    with pytest.raises(ValueError, match="rng"):
        sample(model_jax, x_T, schedule, sampler="ddpm", num_steps=5, cond=cond)
    with pytest.raises(ValueError, match="uncond"):
        sample(model_jax, x_T, schedule, sampler="ddim", num_steps=5, cond=cond, guidance_scale=2.0)
    with pytest.raises(ValueError, match="sampler.*supported values"):
        sample(model_jax, x_T, schedule, sampler="euler", num_steps=5, cond=cond)
    with pytest.raises(ValueError, match="num_steps.*num_train_timesteps=1000"):
        sample(model_jax, x_T, schedule, sampler="ddim", num_steps=1001, cond=cond)
    with pytest.raises(ValueError, match="timesteps: shape"):
        sample(model_jax, x_T, schedule, sampler="ddim", num_steps=5, cond=cond, timesteps=np.arange(6)[::-1])
    with pytest.raises(ValueError, match="descending"):
        sample(model_jax, x_T, schedule, sampler="ddim", num_steps=3, cond=cond, timesteps=[1, 2, 3])
