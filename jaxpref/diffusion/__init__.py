"""The diffusion core, independent of any model (docs/methods.md §0, §2, §3, §4).

Everything takes a model as ``eps_fn(x, t, cond) -> output`` on channels-last latents x [B, H, W, C]
with per-sample integer timesteps t [B]; the output is read in the schedule's prediction_type.

- ``schedule``: ``NoiseSchedule`` (from a diffusers scheduler config), q_sample, ε/x0/v conversions,
  diffusers' timestep grids.
- ``samplers``: ``sample`` (DDIM, DDPM, DPM-Solver++ 2M; one lax.scan; CFG; per-sample grids;
  trajectories for DRO's negatives buffer) and ``dro_timestep_grid``.
- ``inversion``: ``invert`` (DDIM inversion / ReNoise with averaging and noise regularisation) and
  ``smpo_invert`` (SmPO's 5-step inversion as its code runs it, in the paper's clean form, or "consistent":
  latent, timestep and target at one noise level).
"""
from jaxpref.diffusion.inversion import (NOISE_SHIFTS, SMPO_MODES, NoiseRegularization, SmPOInversion,
                                         autocorrelation_loss, ddim_inversion_step, invert, patch_kl_loss,
                                         regularize_noise, renoise_step, smpo_consistent_levels, smpo_grid,
                                         smpo_invert, smpo_landing_timestep, smpo_steps)
from jaxpref.diffusion.samplers import (Trajectory, ddim_step, ddpm_step, dpm_solver_pp_step, dro_timestep_grid,
                                        guided_model, sample, sample_keys, sampler_noise, sampling_grid, step_noise)
from jaxpref.diffusion.schedule import SAMPLERS, NoiseSchedule, output_to_x0_eps

__all__ = [
    "NoiseSchedule", "output_to_x0_eps", "SAMPLERS",
    "Trajectory", "sample", "dro_timestep_grid", "guided_model", "sampling_grid", "sample_keys", "step_noise",
    "sampler_noise", "ddim_step", "ddpm_step", "dpm_solver_pp_step",
    "invert", "smpo_invert", "SmPOInversion", "SMPO_MODES", "smpo_grid", "smpo_landing_timestep",
    "smpo_consistent_levels", "smpo_steps", "NoiseRegularization", "NOISE_SHIFTS",
    "renoise_step", "ddim_inversion_step", "regularize_noise", "patch_kl_loss", "autocorrelation_loss",
]
