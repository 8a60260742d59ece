"""NoiseSchedule against diffusers' PyTorch schedulers: tables, grids, conversions, config validation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from jaxpref.diffusion import NoiseSchedule
from jaxpref.models.presets import SD15_SCHEDULER

SD15 = {**SD15_SCHEDULER, "timestep_spacing": "leading"}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json as shipped (a PNDM config, no spacing key, and
# no prediction_type key: the preset adds that one).
SD15_SHIPPED = {"_diffusers_version": "0.6.0", **{k: v for k, v in SD15_SCHEDULER.items() if k != "prediction_type"}}
SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler}


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler])
def test_alphas_cumprod_bitwise_equal_to_diffusers(beta_schedule, cls):
    config = {**SD15, "beta_schedule": beta_schedule}
    ours = NoiseSchedule.from_config(config)
    theirs = cls.from_config(config)
    np.testing.assert_array_equal(ours.alphas_cumprod_np, theirs.alphas_cumprod.numpy())
    assert ours.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), theirs.alphas_cumprod.numpy())


def test_trained_betas():
    betas = np.linspace(1e-4, 2e-2, 50).tolist()
    config = {**SD15, "num_train_timesteps": 50, "trained_betas": betas}
    np.testing.assert_array_equal(NoiseSchedule.from_config(config).alphas_cumprod_np,
                                  DDIMScheduler.from_config(config).alphas_cumprod.numpy())


def test_sd15_grids():
    sched = NoiseSchedule.from_config(SD15)
    np.testing.assert_array_equal(sched.timesteps(50, "ddim"), np.arange(981, 0, -20))
    np.testing.assert_array_equal(sched.prev_timesteps(50, "ddim"), np.arange(961, -20, -20))
    shipped = NoiseSchedule.from_config(SD15_SHIPPED)  # no spacing key: DPM-Solver's own default, linspace
    assert shipped.spacing_for("dpm++") == "linspace" and shipped.spacing_for("ddim") == "leading"
    np.testing.assert_array_equal(shipped.timesteps(20, "dpm++")[:4], [999, 949, 899, 849])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 30, 50])
def test_timesteps_match_diffusers_set_timesteps(sampler, spacing, num_steps):
    config = dict(SD15_SHIPPED) if spacing is None else {**SD15, "timestep_spacing": spacing}
    theirs = SCHEDULERS[sampler].from_config({k: v for k, v in config.items() if k != "skip_prk_steps"})
    theirs.set_timesteps(num_steps)
    ours = NoiseSchedule.from_config(config)
    np.testing.assert_array_equal(ours.timesteps(num_steps, sampler), theirs.timesteps.numpy())
    if sampler == "ddim":  # DDIMScheduler.step's prev_timestep rule
        np.testing.assert_array_equal(ours.prev_timesteps(num_steps, sampler),
                                      theirs.timesteps.numpy() - 1000 // num_steps)


def test_from_config_path_folder_and_metadata(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_SHIPPED))
    by_dict = NoiseSchedule.from_config(SD15_SHIPPED)
    assert NoiseSchedule.from_config(tmp_path) == by_dict
    assert NoiseSchedule.from_config(str(tmp_path / "scheduler_config.json")) == by_dict
    assert by_dict.timestep_spacing is None and by_dict.steps_offset == 1 and not by_dict.set_alpha_to_one
    dpm = {**SD15_SHIPPED, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
           "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "final_sigmas_type": "zero",
           "lambda_min_clipped": float("-inf"), "use_karras_sigmas": False, "thresholding": False,
           "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "variance_type": None}
    assert NoiseSchedule.from_config(dpm) == by_dict


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler])
def test_full_saved_diffusers_configs_load(cls):
    """Every key a diffusers scheduler writes to scheduler_config.json is understood."""
    config = dict(cls.from_config(SD15_SHIPPED).config)
    ours = NoiseSchedule.from_config(config)
    assert ours.alphas_cumprod_np.shape == (1000,) and ours.steps_offset == 1


@pytest.mark.parametrize("key,value,supported", [
    ("beta_schedule", "sigmoid", "squaredcos_cap_v2"),
    ("prediction_type", "flow_prediction", "v_prediction"),
    ("timestep_spacing", "karras", "trailing"),
    ("thresholding", True, "False"),
    ("rescale_betas_zero_snr", True, "False"),
    ("algorithm_type", "sde-dpmsolver++", "dpmsolver++"),
    ("solver_order", 3, "2"),
    ("variance_type", "learned_range", "fixed_small"),
    ("use_karras_sigmas", True, "False"),
    ("set_alpha_to_one", "yes", "True"),
    ("some_new_option", 1, "timestep_spacing"),
])
def test_unsupported_config_raises_naming_key_and_supported(key, value, supported):
    with pytest.raises(ValueError) as err:
        NoiseSchedule.from_config({**SD15, key: value})
    assert key in str(err.value) and supported in str(err.value)


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_bad_num_steps_raises(num_steps):
    sched = NoiseSchedule.from_config(SD15)
    for sampler in ("ddim", "ddpm", "dpm++"):
        with pytest.raises(ValueError, match="num_steps.*num_train_timesteps=1000"):
            sched.timesteps(num_steps, sampler)
    with pytest.raises(ValueError, match="sampler.*'ddim', 'ddpm', 'dpm\\+\\+'"):
        sched.timesteps(10, "euler")


def test_q_sample_velocity_and_conversions_match_diffusers():
    sched = NoiseSchedule.from_config(SD15)
    theirs = DDPMScheduler.from_config(SD15)
    rng = np.random.RandomState(0)
    x0, noise = rng.randn(3, 4, 4, 2).astype(np.float32), rng.randn(3, 4, 4, 2).astype(np.float32)
    t = np.array([0, 500, 999])
    xt = np.asarray(sched.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    ref = theirs.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    np.testing.assert_allclose(xt, ref, rtol=1e-6, atol=1e-6)
    v = np.asarray(sched.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(v, theirs.get_velocity(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy(),
                               rtol=1e-6, atol=1e-6)
    # Each parameterisation's model output maps back to the same (x0, ε).
    for prediction_type, output in [("epsilon", noise), ("v_prediction", v), ("sample", x0)]:
        s = NoiseSchedule.from_config({**SD15, "prediction_type": prediction_type})
        np.testing.assert_allclose(s.pred_to_x0(jnp.asarray(output), xt, t), x0, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(s.pred_to_eps(jnp.asarray(output), xt, t), noise, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(s.training_target(jnp.asarray(x0), jnp.asarray(noise), t), output, rtol=1e-6)
    np.testing.assert_allclose(sched.eps_to_x0(noise, xt, t), x0, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(sched.x0_to_eps(x0, xt, t), noise, rtol=2e-4, atol=2e-4)


def test_final_alpha_and_negative_timesteps():
    sched = NoiseSchedule.from_config(SD15)
    assert sched.final_alpha_cumprod == pytest.approx(float(sched.alphas_cumprod_np[0]))
    assert NoiseSchedule.from_config({**SD15, "set_alpha_to_one": True}).final_alpha_cumprod == 1.0
    a = np.asarray(sched.alpha_cumprod_at(jnp.array([-199, 0, 999]), final=0.5))
    np.testing.assert_array_equal(a, [0.5, sched.alphas_cumprod_np[0], sched.alphas_cumprod_np[999]])


def test_schedule_is_hashable_static_pytree():
    a, b = NoiseSchedule.from_config(SD15), NoiseSchedule.from_config(dict(SD15))
    assert a == b and hash(a) == hash(b) and jax.tree_util.tree_leaves(a) == []
    traces = []

    @jax.jit
    def f(schedule, x, t):
        traces.append(1)
        return schedule.q_sample(x, t, x)

    x, t = jnp.ones((2, 4, 4, 1)), jnp.array([3, 7])
    np.testing.assert_allclose(f(a, x, t), a.q_sample(x, t, x), rtol=1e-6)
    f(b, x + 1, t)  # an equal schedule: cache hit
    assert len(traces) == 1
    f(NoiseSchedule.from_config({**SD15, "beta_schedule": "linear"}), x, t)  # a different one retraces
    assert len(traces) == 2
