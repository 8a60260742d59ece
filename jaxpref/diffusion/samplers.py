"""DDIM, DDPM and DPM-Solver++(2M) sampling as one ``jax.lax.scan`` each, with per-sample timestep grids.

All three reproduce diffusers' PyTorch schedulers step for step (DDIMScheduler, DDPMScheduler with
variance_type "fixed_small", DPMSolverMultistepScheduler with algorithm_type "dpmsolver++",
solver_order 2, final_sigmas_type "zero"). The model is any ``eps_fn(x, t, cond) -> output`` on
channels-last latents x [B, H, W, C] with per-sample integer timesteps t [B]; its output is read in the
schedule's ``prediction_type`` (ε for SD1.5).

Grids are carried per sample, [S, B] time-major, so every sample can follow its own timesteps:
Diffusion-DRO's online negatives use 950, 900, ..., 0 plus one offset p per trajectory (docs/methods.md §2),
and DPM-Solver++ then uses each sample's own σ/λ (the reference code used sample 0's for all).

``sample`` is a pure traceable function: call it under ``jax.jit`` (with the model params as a jit
argument, closed over by ``eps_fn`` inside the jitted function) and the whole trajectory is one
compiled program, compiled once per shape. Called eagerly it would re-trace the scan on every call.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.diffusion.schedule import (NoiseSchedule, _bcast, _check_sampler, check_num_steps, next_timesteps,
                                        output_to_x0_eps)

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class Trajectory(NamedTuple):
    """One record per sampling step, time-major (what Diffusion-DRO's negatives buffer stores, docs/methods.md §2).

    timesteps: [S, B] int32, the t_k each sample was evaluated at.
    latents:   [S, B, H, W, C] float32, the latent x_k fed to the model at step k.
    eps:       [S, B, H, W, C] float32, the (guided) model output at (x_k, t_k): ε_θ(x_k, t_k) for an
               ε-prediction model; for other prediction types the raw output in that parameterisation
               (the quantity a DRO loss compares the policy output against).
    """
    timesteps: jax.Array
    latents: jax.Array
    eps: jax.Array


# ---------------------------------------------------------------------------------------------
# Model wrapper, grids and per-sample noise.

def guided_model(eps_fn: EpsFn, cond=None, uncond=None, guidance_scale: float = 1.0):
    """``model(x, t) -> output`` [B, ...] float32 with classifier-free guidance.

    guidance_scale == 1: one call, eps_fn(x, t, cond). Otherwise ONE call on the batch
    [uncond; cond] (concatenated on axis 0, leaf by leaf for pytree conds) and
    out = out_u + g (out_c − out_u), as diffusers' pipelines do. ``guidance_scale`` is a Python number
    (static: it decides the batch layout at trace time).
    """
    if guidance_scale == 1.0:
        return lambda x, t: eps_fn(x, t, cond).astype(jnp.float32)
    if uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs `uncond` (e.g. the empty-prompt embedding); "
                         "pass uncond=..., or guidance_scale=1.0 for a single conditional call")
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def model(x, t):
        out = eps_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both).astype(jnp.float32)
        out_u, out_c = jnp.split(out, 2, axis=0)
        return out_u + guidance_scale * (out_c - out_u)

    return model


def sample_keys(rng: jax.Array, batch: int) -> jax.Array:
    """One key per sample: fold_in(rng, b). Sample b's noise never depends on the batch size."""
    return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch, dtype=jnp.uint32))


def step_noise(keys: jax.Array, step, shape: tuple) -> jax.Array:
    """N(0, 1) noise [B, *shape] float32 for sampling step ``step``: normal(fold_in(keys[b], step), shape)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, jnp.float32))(keys)


def sampler_noise(rng: jax.Array, batch: int, num_steps: int, shape: tuple) -> jax.Array:
    """The noise ``sample`` draws for DDPM / DDIM(eta > 0): [num_steps, batch, *shape] (for tests/replay)."""
    keys = sample_keys(rng, batch)
    return jax.vmap(lambda k: step_noise(keys, k, shape))(jnp.arange(num_steps))


def dro_timestep_grid(rng: jax.Array, batch: int, num_steps: int = 20, num_train_timesteps: int = 1000) -> jax.Array:
    """Diffusion-DRO's perturbed grid [batch, num_steps] int32 (docs/methods.md §2).

    Base grid (S−1)·r, ..., r, 0 with r = T // S (950, 900, ..., 0 for 20 of 1000) plus one offset
    p ~ U{0, ..., r−1} per trajectory, so a uniformly picked step of a trajectory has t uniform on
    0..T−1 (when S divides T). As the reference's ``randint(0, step_ratio)``.
    """
    ratio = num_train_timesteps // num_steps
    base = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32) * ratio
    offset = jax.random.randint(rng, (batch, 1), 0, ratio, dtype=jnp.int32)
    return base[None, :] + offset


def sampling_grid(schedule: NoiseSchedule, sampler: str, num_steps: int, batch: int, timesteps=None):
    """(t, t_next): the timesteps each step evaluates and moves to, both [S, B] int32 (t_next < 0: end).

    timesteps None: diffusers' grid for ``sampler`` (``NoiseSchedule.timesteps`` / ``prev_timesteps``).
    timesteps [S] or [B, S] (descending per sample; may be traced): t_next is the next entry, −1 after
    the last (for DDIM too: DDIM's t − T//S only coincides with it on uniform grids like DRO's).
    """
    _check_sampler(sampler)
    if timesteps is None:
        t = schedule.timesteps(num_steps, sampler)
        t_next = schedule.prev_timesteps(num_steps, sampler)
        t, t_next = (jnp.broadcast_to(jnp.asarray(a)[:, None], (num_steps, batch)) for a in (t, t_next))
        return t, t_next
    if isinstance(timesteps, (list, tuple, np.ndarray)):
        _check_grid(np.asarray(timesteps), schedule.num_train_timesteps)
    grid = jnp.asarray(timesteps, jnp.int32)
    if grid.ndim not in (1, 2) or grid.shape[-1] != num_steps or (grid.ndim == 2 and grid.shape[0] != batch):
        raise ValueError(f"timesteps: shape {grid.shape} is not supported; supported shapes: "
                         f"[num_steps={num_steps}] or [batch={batch}, num_steps={num_steps}]")
    grid = jnp.broadcast_to(grid, (batch, num_steps))
    return grid.T, next_timesteps(grid).T


def _check_grid(grid: np.ndarray, num_train_timesteps: int) -> None:
    if grid.size and (grid.min() < 0 or grid.max() >= num_train_timesteps or np.any(np.diff(grid, axis=-1) >= 0)):
        raise ValueError(f"timesteps must be strictly descending within [0, {num_train_timesteps}); got {grid}")


# ---------------------------------------------------------------------------------------------
# One step of each sampler (pure, per-sample coefficients broadcast over [B, H, W, C]).

def _clip(x0, schedule: NoiseSchedule):
    return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range) if schedule.clip_sample else x0


def ddim_step(out, x, a_t, a_prev, schedule: NoiseSchedule, eta: float = 0.0, noise=None):
    """DDIM (Song et al. 2021, Eq. 12) as diffusers' DDIMScheduler.step.

    out, x: [B, ...]; a_t, a_prev: ᾱ at t and at the step's target, broadcastable [B, 1, ...];
    noise: N(0, 1) like x when eta > 0. σ = eta·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)).
    """
    x0, eps = output_to_x0_eps(out, x, a_t, schedule.prediction_type)
    x0 = _clip(x0, schedule)  # diffusers keeps the unclipped ε (use_clipped_model_output=False)
    std = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std ** 2) * eps
    return x_prev + std * noise if eta > 0 else x_prev


def ddpm_step(out, x, a_t, a_prev, schedule: NoiseSchedule, noise, add_noise):
    """Ancestral DDPM step (Ho et al. 2020, Eq. 7) as diffusers' DDPMScheduler.step, fixed_small variance.

    a_prev = 1 after the last step; noise is added where ``add_noise`` (diffusers: t > 0), with variance
    max((1−ᾱ_prev)/(1−ᾱ_t)·β_t, 1e-20), β_t = 1 − ᾱ_t/ᾱ_prev.
    """
    x0, _ = output_to_x0_eps(out, x, a_t, schedule.prediction_type)
    x0 = _clip(x0, schedule)
    alpha_t = a_t / a_prev
    beta_t = 1.0 - alpha_t
    mean = (jnp.sqrt(a_prev) * beta_t / (1.0 - a_t)) * x0 + (jnp.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t)) * x
    var = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
    return mean + jnp.where(add_noise, jnp.sqrt(var), 0.0) * noise


def _dpm_alpha_sigma_lambda(sigma):
    """DPM-Solver's (α_t, σ_t, λ_t) from the VE sigma σ = sqrt((1−ᾱ)/ᾱ), as diffusers computes them."""
    alpha = 1.0 / jnp.sqrt(sigma ** 2 + 1.0)
    sig = sigma * alpha
    return alpha, sig, jnp.log(alpha) - jnp.log(sig)


def dpm_solver_pp_step(m0, m1, x, sigma_s0, sigma_s1, sigma_t, first_order):
    """One DPM-Solver++(2M) update (Lu et al. 2022, midpoint form) as diffusers computes it.

    m0, m1: data (x0) predictions at this and the previous step [B, ...]; sigma_*: VE sigmas at this
    step (s0), the previous step (s1) and the target (t), broadcastable [B, 1, ...]; first_order: bool
    (first step, and the final step since final_sigmas_type is "zero"). σ_t = 0 returns m0 exactly, the
    limit of the first-order formula, without evaluating log 0.
    """
    final = sigma_t == 0
    alpha_t, sig_t, lam_t = _dpm_alpha_sigma_lambda(jnp.where(final, 1.0, sigma_t))
    _, sig_s0, lam_s0 = _dpm_alpha_sigma_lambda(sigma_s0)
    _, _, lam_s1 = _dpm_alpha_sigma_lambda(sigma_s1)
    h = lam_t - lam_s0
    phi = alpha_t * (jnp.exp(-h) - 1.0)
    x_first = (sig_t / sig_s0) * x - phi * m0
    r0 = (lam_s0 - lam_s1) / h
    d1 = (m0 - m1) / jnp.where(first_order, 1.0, r0)
    x_second = x_first - 0.5 * phi * d1
    return jnp.where(final, m0, jnp.where(first_order, x_first, x_second))


# ---------------------------------------------------------------------------------------------
# The samplers.

def sample(eps_fn: EpsFn, x_T: jax.Array, schedule: NoiseSchedule, *, sampler: str, num_steps: int,
           guidance_scale: float = 1.0, rng: Optional[jax.Array] = None, cond=None, uncond=None,
           timesteps=None, return_trajectory: bool = False, eta: float = 0.0):
    """Samples x_0 from x_T [B, H, W, C] with one ``lax.scan`` over ``num_steps`` steps.

    sampler: "ddim" (eta >= 0; eta > 0 draws noise), "ddpm" (ancestral, fixed_small variance), or
      "dpm++" (DPM-Solver++ 2M: first-order first and final steps, second-order in between, σ = 0 at
      the end, as DPMSolverMultistepScheduler with solver_order 2 and lower_order_final).
    guidance_scale: classifier-free guidance (Python float); != 1 needs ``uncond`` and makes ONE
      eps_fn call per step on the concatenated [uncond; cond] batch.
    rng: needed by "ddpm" and by "ddim" with eta > 0. Sample b draws its step-k noise from
      fold_in(fold_in(rng, b), k) (``sampler_noise``), independent of the batch size.
    cond, uncond: pytrees with leading batch axis B passed to eps_fn (e.g. text embeddings [B, L, D]).
    timesteps: optional [S] or [B, S] int grid (descending) replacing diffusers' grid, e.g.
      ``dro_timestep_grid``; each sample then gets its own ᾱ (and its own σ/λ for DPM-Solver++).
    return_trajectory: also return ``Trajectory`` (timesteps, the latent fed to eps_fn, its guided output).

    Returns x_0 [B, H, W, C] in x_T's dtype, or (x_0, Trajectory). Updates run in float32.
    """
    _check_sampler(sampler)
    check_num_steps(num_steps, schedule.num_train_timesteps)
    if eta < 0:
        raise ValueError(f"eta={eta} is not supported; supported values: eta >= 0")
    needs_rng = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    if needs_rng and rng is None:
        raise ValueError(f"sampler={sampler!r} (eta={eta}) draws noise: pass rng=jax.random.key(...)")
    batch = x_T.shape[0]
    t, t_next = sampling_grid(schedule, sampler, num_steps, batch, timesteps)
    model = guided_model(eps_fn, cond, uncond, guidance_scale)
    keys = sample_keys(rng, batch) if needs_rng else None
    x = x_T.astype(jnp.float32)
    run = {"ddim": _ddim_scan, "ddpm": _ddpm_scan, "dpm++": _dpm_scan}[sampler]
    x0, (ts, xs, outs) = run(model, x, schedule, t, t_next, keys=keys, eta=eta, record=return_trajectory)
    x0 = x0.astype(x_T.dtype)
    return (x0, Trajectory(ts, xs, outs)) if return_trajectory else x0


def _record(record: bool, t, x, out):
    return (t, x, out) if record else (None, None, None)


def _ddim_scan(model, x, schedule, t, t_next, *, keys, eta, record):
    a_t = schedule.alpha_cumprod_at(t)
    a_next = schedule.alpha_cumprod_at(t_next)  # < 0: final_alpha_cumprod

    def body(x, xs):
        k, t_k, a, a_n = xs
        out = model(x, t_k)
        noise = step_noise(keys, k, x.shape[1:]) if eta > 0 else None
        x_new = ddim_step(out, x, _bcast(a, x), _bcast(a_n, x), schedule, eta, noise)
        return x_new, _record(record, t_k, x, out)

    return jax.lax.scan(body, x, (jnp.arange(t.shape[0]), t, a_t, a_next))


def _ddpm_scan(model, x, schedule, t, t_next, *, keys, eta, record):
    del eta
    a_t = schedule.alpha_cumprod_at(t)
    a_next = schedule.alpha_cumprod_at(t_next, final=1.0)  # DDPMScheduler: ᾱ_prev = 1 past the end

    def body(x, xs):
        k, t_k, a, a_n = xs
        out = model(x, t_k)
        noise = step_noise(keys, k, x.shape[1:])
        x_new = ddpm_step(out, x, _bcast(a, x), _bcast(a_n, x), schedule, noise, _bcast(t_k > 0, x))
        return x_new, _record(record, t_k, x, out)

    return jax.lax.scan(body, x, (jnp.arange(t.shape[0]), t, a_t, a_next))


def _dpm_scan(model, x, schedule, t, t_next, *, keys, eta, record):
    """DPM-Solver++(2M) on per-sample grids: carry (x, previous x0 prediction)."""
    del keys, eta
    table = jnp.asarray(schedule.dpm_sigmas_np)
    num_steps = t.shape[0]
    sigma_s0 = table[jnp.clip(t, 0, None)]
    sigma_t = jnp.where(t_next >= 0, table[jnp.clip(t_next, 0, None)], 0.0)  # final_sigmas_type "zero"
    sigma_s1 = jnp.concatenate([sigma_s0[:1], sigma_s0[:-1]], axis=0)       # unused at step 0
    steps = jnp.arange(num_steps)
    first_order = (steps == 0) | (steps == num_steps - 1)

    def body(carry, xs):
        x, m1 = carry
        t_k, s0, s1, st, first = xs
        out = model(x, t_k)
        alpha_s0, sig_s0, _ = _dpm_alpha_sigma_lambda(_bcast(s0, x))
        m0 = _to_x0_dpm(out, x, alpha_s0, sig_s0, schedule.prediction_type)
        x_new = dpm_solver_pp_step(m0, m1, x, _bcast(s0, x), _bcast(s1, x), _bcast(st, x), first)
        return (x_new, m0), _record(record, t_k, x, out)

    (x0, _), rec = jax.lax.scan(body, (x, jnp.zeros_like(x)), (t, sigma_s0, sigma_s1, sigma_t, first_order))
    return x0, rec


def _to_x0_dpm(out, x, alpha, sigma, prediction_type: str):
    """DPMSolverMultistepScheduler.convert_model_output for dpmsolver++ (α, σ from the VE sigma)."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    return out
