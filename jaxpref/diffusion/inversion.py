"""DDIM inversion, ReNoise (docs/methods.md §4) and SmPO's inversion of the training images (docs/methods.md §3).

Every inversion here is one ``jax.lax.scan`` over a fixed number of grid steps, batched over images;
samples that need fewer steps (SmPO: one t per sample) are masked, so shapes never depend on data.

The basic move is the DDIM update run backwards, from level s to a noisier level s':

    inv(x, ε; s → s') = √ᾱ_s' (x − √(1−ᾱ_s) ε)/√ᾱ_s + √(1−ᾱ_s') ε,

with ᾱ = ``final_alpha_cumprod`` for a negative level (the clean end of the chain; diffusers'
DDIMInverseScheduler calls it ``initial_alpha_cumprod``; ᾱ_0 for SD1.5, whose set_alpha_to_one is false).
It is the exact inverse of ``ddim_step`` (eta 0) from s' to s for the same ε, so inverting along a grid
and then sampling DDIM along it reconstructs x0 when ε is evaluated at the same points.

ReNoise (Garibi et al. 2024): ε is evaluated at the *target* level s', where the latent is not known
yet, by fixed-point iteration z^{k+1} = inv(x_s, ε(z^k, s')), starting from z^0 = x_s; the ε's of
iterations in a window [a, b) are averaged for the final update; optionally each ε is nudged towards
Gaussian statistics (noise regularisation: patch-KL and autocorrelation terms).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.diffusion import row_chunks
from jaxpref.diffusion.samplers import EpsFn, Trajectory, guided_model, sample_keys, sampling_grid
from jaxpref.diffusion.schedule import NoiseSchedule, _bcast, check_num_steps, output_to_x0_eps

SMPO_MODES = ("code", "paper", "consistent")  # docs/methods.md §3


def ddim_inversion_step(x_s: jax.Array, eps: jax.Array, a_s: jax.Array, a_t: jax.Array) -> jax.Array:
    """inv(x_s, ε; s → t) = √ᾱ_t (x_s − √(1−ᾱ_s) ε)/√ᾱ_s + √(1−ᾱ_t) ε. ᾱ's broadcast against x_s."""
    x0 = (x_s - jnp.sqrt(1.0 - a_s) * eps) / jnp.sqrt(a_s)
    return jnp.sqrt(a_t) * x0 + jnp.sqrt(1.0 - a_t) * eps


# ---------------------------------------------------------------------------------------------
# ReNoise noise regularisation (Garibi et al. 2024, §4.2; formulas from their released code, which
# adapts pix2pix-zero's). Per-sample losses on one latent [H, W, C].

# smpo.inversion_noise_shifts -> NoiseRegularization.min_shift: the released code's rolls or the formula's.
NOISE_SHIFTS = {"code": 0, "paper": 1}


@dataclasses.dataclass(frozen=True)
class NoiseRegularization:
    """ReNoise's noise regularisation of each ε estimate; defaults are the released code's.

    num_reg_steps rounds of: one gradient step of ``patch_kl_loss`` (gradient clipped to ±kl_grad_clip,
    step lambda_kl), then num_ac_rolls gradient steps of ``autocorrelation_loss`` (gradient divided by
    num_ac_rolls, step lambda_ac), each with fresh random rolls. min_shift: the smallest roll, 0 as the released
    code (shifts 0..H/2−1; shift 0 is mean(ε²)², a pull towards zero variance) or 1 as the regulariser's formula
    (Σ over δ >= 1: shifts 1..H/2, correlations only). On SD's 64×64 latents the two barely differ (shift 0 is
    drawn at the 8×8 pyramid level only, once in four rolls there); on 8×8 latents it is every level.
    """
    lambda_kl: float = 0.065
    lambda_ac: float = 20.0
    num_reg_steps: int = 4
    num_ac_rolls: int = 5
    patch_size: int = 4
    kl_grad_clip: float = 100.0
    min_shift: int = 0


def patch_kl_loss(eps: jax.Array, eps_ref: jax.Array, patch_size: int = 4) -> jax.Array:
    """Σ over p×p patches and channels of |KL-like| gap between the patch statistics of ε and ε_ref.

    eps, eps_ref: [H, W, C] (H, W divisible by p). Per patch and channel, with unbiased variances:
    log((v_ref+δ)/(v+δ)) + (v + (μ − μ_ref)²)/(v_ref+δ) − 1, δ = 1e-6 (no ½, absolute value, as the code).
    """
    def stats(x):
        h, w, c = x.shape
        x = x.reshape(h // patch_size, patch_size, w // patch_size, patch_size, c)
        return x.mean(axis=(1, 3)), x.var(axis=(1, 3), ddof=1)

    (mu0, var0), (mu1, var1) = stats(eps), stats(eps_ref)
    delta = 1e-6
    kl = jnp.log((var1 + delta) / (var0 + delta)) + (var0 + (mu0 - mu1) ** 2) / (var1 + delta) - 1.0
    return jnp.abs(kl).sum()


def autocorrelation_loss(eps: jax.Array, rng: jax.Array, min_shift: int = 0) -> jax.Array:
    """Σ over channels and pyramid levels of squared mean autocorrelations at a random shift.

    eps: [H, W, C]. Per channel, at each level (2× average-pooled until H <= 8): one random shift
    r ~ U{min_shift, ..., H/2 − 1 + min_shift}; adds mean(n · roll(n, r, rows))² + mean(n · roll(n, r, cols))².
    """
    def one_channel(n, key):
        loss = 0.0
        level = 0
        while True:
            r = jax.random.randint(jax.random.fold_in(key, level), (), min_shift,
                                   max(n.shape[0] // 2, 1) + min_shift)
            loss += jnp.mean(n * jnp.roll(n, r, axis=0)) ** 2 + jnp.mean(n * jnp.roll(n, r, axis=1)) ** 2
            if n.shape[0] <= 8:
                return loss
            h, w = n.shape[0] // 2 * 2, n.shape[1] // 2 * 2
            n = n[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            level += 1

    keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(eps.shape[-1]))
    return jax.vmap(one_channel, in_axes=(-1, 0))(eps, keys).sum()


def regularize_noise(eps: jax.Array, eps_ref: jax.Array, keys: jax.Array, config: NoiseRegularization) -> jax.Array:
    """Gradient steps pulling each ε [B, H, W, C] towards Gaussian statistics; keys: [B] (random rolls)."""
    def one(e, ref, key):
        def outer(r, e):
            if config.lambda_kl > 0:
                g = jax.grad(patch_kl_loss)(e, ref, config.patch_size)
                e = e - config.lambda_kl * jnp.clip(g, -config.kl_grad_clip, config.kl_grad_clip)
            if config.lambda_ac > 0:
                def inner(j, e):
                    key_rj = jax.random.fold_in(key, r * config.num_ac_rolls + j)
                    grad = jax.grad(autocorrelation_loss)(e, key_rj, config.min_shift)
                    return e - config.lambda_ac * grad / config.num_ac_rolls
                e = jax.lax.fori_loop(0, config.num_ac_rolls, inner, e)
            return e
        return jax.lax.fori_loop(0, config.num_reg_steps, outer, e)

    return jax.vmap(one)(eps, eps_ref, keys)


# ---------------------------------------------------------------------------------------------
# One ReNoise step and the masked inversion scan.

def renoise_step(model, x_s, a_s, a_t, t_call, a_call, *, prediction_type: str = "epsilon",
                 renoise_steps: int = 0, average_window: Optional[tuple] = None,
                 noise_regularization: Optional[NoiseRegularization] = None, x_ref=None, keys=None):
    """One inversion step x_s (level s) -> x_t (level t) with ReNoise iterations. Returns (x_t, ε used).

    model(x, t) -> output [B, ...]; a_s, a_t, a_call: ᾱ at s, at t and at the timestep t_call [B] the
    model is told (ReNoise: t_call = t), broadcastable [B, 1, ...]. The output is read as ε via ᾱ(t_call).
    Iteration i = 0 evaluates ε(x_s) and i = 1..K = ``renoise_steps`` evaluate ε(z^i), z^i = inv(x_s, ε_{i−1}).
    average_window (a, b): the final update uses the mean of ε_i over a <= i < b (None: the last z).
    noise_regularization: regularises ε_i for i >= a (i >= 1 without a window) and the mean, against the
    prediction at x_ref = q_sample(x0, t, ε_ref) (needs x_ref and per-sample ``keys`` [B]).
    """
    def eps_at(out, z):
        return output_to_x0_eps(out, z, a_call, prediction_type)[1]

    def inv(e):
        return ddim_inversion_step(x_s, e, a_s, a_t)

    window = average_window
    lo, hi = (window if window is not None else (0, 0))
    in_window = lambda i: (i >= lo) & (i < hi)
    reg_from = lo if window is not None else 1

    eps_ref = None
    if noise_regularization is not None:  # (the reference code batches this call with the first one)
        eps_ref = eps_at(model(x_ref, t_call), x_ref)
    e = eps_at(model(x_s, t_call), x_s)

    def regularize(e, i):
        if noise_regularization is None:
            return e
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        return jax.lax.cond(i >= reg_from, lambda e: regularize_noise(e, eps_ref, step_keys, noise_regularization),
                            lambda e: e, e)

    acc = jnp.where(in_window(0), e, 0.0)
    count = jnp.where(in_window(0), 1, 0)
    e = regularize(e, 0)
    z = inv(e)

    def iteration(i, carry):
        z, acc, count, _ = carry
        e = eps_at(model(z, t_call), z)
        acc = acc + jnp.where(in_window(i), e, 0.0)
        count = count + jnp.where(in_window(i), 1, 0)
        e = regularize(e, i)
        return inv(e), acc, count, e

    if renoise_steps > 0:
        z, acc, count, e = jax.lax.fori_loop(1, renoise_steps + 1, iteration, (z, acc, count, e))
    if window is not None and lo < min(hi, renoise_steps + 1):  # the window holds >= 1 iteration
        e = acc / count
        e = regularize(e, renoise_steps + 1)
        z = inv(e)
    return z, e


def _inversion_scan(model, x0, schedule: NoiseSchedule, *, t_src, t_tgt, t_call, active=None,
                    renoise_steps=0, average_window=None, noise_regularization=None, rng=None,
                    record=False, clean_alpha=None, keys=None):
    """Inverts x0 [B, ...] along per-sample grids t_src -> t_tgt (model told t_call), all [S, B] int32.

    Negative levels read ᾱ = clean_alpha (default ``final_alpha_cumprod``). Noise regularisation draws its
    reference noise and rolls from per-sample ``keys`` [B], or from ``sample_keys(rng, B)``.

    active [S, B] bool (None: all): inactive samples keep their latent; a step where no sample is
    active is skipped (``lax.cond``) rather than computed and discarded.
    Returns (x [B, ...] float32, (t_tgt, latents after each step, ε used) if record).
    """
    x = x0.astype(jnp.float32)
    a_src, a_tgt, a_call = (schedule.alpha_cumprod_at(t, clean_alpha) for t in (t_src, t_tgt, t_call))
    if active is None:
        active = jnp.ones(t_src.shape, bool)
    ref_noise = None
    if noise_regularization is not None:
        if keys is None and rng is None:
            raise ValueError("noise_regularization draws a reference noise and random rolls: "
                             "pass rng=jax.random.key(...)")
        keys = sample_keys(rng, x.shape[0]) if keys is None else keys
        ref_noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)

    def step(x, xs):
        k, tt, tc, a_s, a_t, a_c, on = xs
        x_ref = None
        if noise_regularization is not None:  # q_sample(x0, t, ε_ref): ReNoise's reference point
            x_ref = jnp.sqrt(_bcast(a_t, x)) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - _bcast(a_t, x)) * ref_noise
        step_keys = None if ref_noise is None else jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)
        x_new, e = renoise_step(model, x, _bcast(a_s, x), _bcast(a_t, x), tc, _bcast(a_c, x),
                                prediction_type=schedule.prediction_type, renoise_steps=renoise_steps,
                                average_window=average_window, noise_regularization=noise_regularization,
                                x_ref=x_ref, keys=step_keys)
        return jnp.where(_bcast(on, x), x_new, x), e

    def body(x, xs):
        on = xs[-1]
        x_new, e = jax.lax.cond(jnp.any(on), step, lambda x, xs: (x, jnp.zeros_like(x)), x, xs)
        return x_new, ((xs[1], x_new, e) if record else None)

    steps = jnp.arange(t_src.shape[0])
    return jax.lax.scan(body, x, (steps, t_tgt, t_call, a_src, a_tgt, a_call, active))


# ---------------------------------------------------------------------------------------------
# Public inversions.

def invert(eps_fn: EpsFn, x0: jax.Array, schedule: NoiseSchedule, *, num_steps: int, cond=None, uncond=None,
           guidance_scale: float = 1.0, renoise_steps: int = 0, average_window: Optional[tuple] = None,
           noise_regularization: Optional[NoiseRegularization] = None, rng: Optional[jax.Array] = None,
           timesteps=None, return_trajectory: bool = False):
    """Inverts clean latents x0 [B, H, W, C] to x_T along the DDIM grid, one ``lax.scan`` (docs/methods.md §4).

    The grid is the one ``sample(..., sampler="ddim", num_steps=num_steps, timesteps=timesteps)``
    walks, reversed: inversion step k undoes sampling step S−1−k, going from the level that sampling
    step lands on up to the level t it evaluates the model at, and calls the model at t (the target of
    the inversion step: ReNoise's convention, and diffusers' current DDIMInverseScheduler's). The first
    source is the clean end (ᾱ = final_alpha_cumprod, where DDIM sampling ends). So
    ``sample(eps_fn, invert(eps_fn, x0, ...), ...)`` reconstructs x0 up to the error of evaluating ε at
    the source latent instead of the unknown target latent, which the ReNoise iterations remove.

    renoise_steps: K fixed-point iterations (0 = plain DDIM inversion). average_window: (a, b), mean ε
      over iterations a <= i < b for the final update (ReNoise's code: (0, 5) near t = 0, (8, 10) else);
      None uses the last iterate. noise_regularization: ``NoiseRegularization()`` for the paper's
      defaults; needs ``rng``. guidance_scale/uncond: classifier-free guidance as in ``sample``.
    timesteps: optional [S] or [B, S] descending sampling grid (S = num_steps).
    return_trajectory: also return ``Trajectory`` with timesteps = each step's target t [S, B], latents =
      the latent reached at t [S, B, H, W, C], eps = the ε used for that step.

    Returns x_T [B, H, W, C] in x0's dtype, or (x_T, Trajectory).
    """
    check_num_steps(num_steps, schedule.num_train_timesteps)
    batch = x0.shape[0]
    t, t_next = sampling_grid(schedule, "ddim", num_steps, batch, timesteps)
    t_tgt, t_src = t[::-1], t_next[::-1]
    model = guided_model(eps_fn, cond, uncond, guidance_scale)
    x_T, rec = _inversion_scan(model, x0, schedule, t_src=t_src, t_tgt=t_tgt, t_call=t_tgt,
                               renoise_steps=renoise_steps, average_window=average_window,
                               noise_regularization=noise_regularization, rng=rng, record=return_trajectory)
    x_T = x_T.astype(x0.dtype)
    return (x_T, Trajectory(*rec)) if return_trajectory else x_T


class SmPOInversion(NamedTuple):
    """``smpo_invert``'s result (docs/methods.md §3).

    latents:  [B, H, W, C] the inverted x̃ (float32).
    target:   [B, H, W, C] τ = (x̃ − √ᾱ_t x0)/√(1−ᾱ_t) at t = ``timestep``: the regression target of the
              policy and reference predictions at (x̃, timestep).
    timestep: [B] int32, the t the policy and reference are evaluated at: the sampled t in every mode. The
              latent sits at that level in "paper" and "consistent" modes; in "code" mode it sits at
              ``smpo_landing_timestep`` (>= t), which the released code ignores.
    """
    latents: jax.Array
    target: jax.Array
    timestep: jax.Array


def smpo_grid(schedule: NoiseSchedule, num_steps: int = 5) -> np.ndarray:
    """SmPO's inversion source levels [num_steps] int, from diffusers 0.20's DDIMInverseScheduler.

    The SmPO code (diffusers==0.20.0) calls ``DDIMInverseScheduler.set_timesteps(N)`` (SD1.5: N = 5,
    SDXL: N = 10): the DDIM grid ascending (leading: 1, 201, 401, 601, 801 with steps_offset 1), rolled
    right by one with the first entry replaced by (second − T//N): SD1.5 −199, 1, 201, 401, 601. Its
    ``step(ε, s, x)`` moves from level s to s + T//N and reads ᾱ_s = ``initial_alpha_cumprod`` for s < 0
    (1.0 if set_alpha_to_one else ᾱ_0; SD1.5: ᾱ_0 = 0.99915, i.e. x0 is treated as the clean level).
    """
    check_num_steps(num_steps, schedule.num_train_timesteps)
    T = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing or "leading"  # DDIMInverseScheduler's default
    if spacing == "leading":
        ratio = T // num_steps
        ts = np.arange(0, num_steps) * ratio + schedule.steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)[::-1]).astype(np.int64) - 1
    else:
        raise ValueError(f"scheduler config: timestep_spacing={spacing!r} is not supported by SmPO's "
                         "DDIMInverseScheduler grid; supported values: ('leading', 'trailing')")
    ts = np.roll(ts, 1)
    ts[0] = int(ts[1] - ratio) if num_steps > 1 else int(ts[0] - ratio)
    return ts.astype(np.int32)


def _smpo_levels(schedule: NoiseSchedule, num_steps: int, grid=None):
    src = np.asarray(grid if grid is not None else smpo_grid(schedule, num_steps), np.int32)
    return src, src + schedule.num_train_timesteps // len(src)


def smpo_landing_timestep(t: jax.Array, schedule: NoiseSchedule, *, num_steps: int = 5, mode: str = "code",
                          grid=None) -> jax.Array:
    """The level x̃ sits at after ``smpo_invert`` [B] int32: t in "paper" and "consistent" modes; in "code"
    mode L(t) = s* + T//N for the largest grid source s* < t, i.e. the smallest grid target >= t, capped at
    the top target (SD1.5: 1 for t <= 1, 201 for 2 <= t <= 201, ..., 801 for t > 601, below t when t > 801).
    """
    _check_mode(mode)
    t = jnp.asarray(t, jnp.int32)
    if mode != "code":
        return t
    src, tgt = _smpo_levels(schedule, num_steps, grid)
    on = jnp.asarray(src)[None, :] < t[:, None]
    return jnp.max(jnp.where(on, jnp.asarray(tgt)[None, :], jnp.iinfo(jnp.int32).min), axis=1)


def smpo_consistent_levels(t: jax.Array, num_steps: int) -> jax.Array:
    """The "consistent" inversion's per-sample levels [num_steps + 1, B] int32 (docs/methods.md §3).

    −1 (clean data, ᾱ = 1), then ℓ_k = ⌊(k/S)² (t + 1)⌋ − 1, ending exactly at ℓ_S = t. Quadratic spacing
    puts the short steps near the clean end, where ε changes fastest with the level; equal neighbours
    (small t) are no-op steps.
    """
    k = jnp.arange(num_steps + 1, dtype=jnp.int32)[:, None]
    return (k * k * (jnp.asarray(t, jnp.int32)[None, :] + 1)) // (num_steps * num_steps) - 1


def _check_mode(mode: str) -> None:
    if mode not in SMPO_MODES:
        raise ValueError(f"mode={mode!r} is not supported; supported values: {SMPO_MODES}")


def smpo_steps(t: jax.Array, schedule: NoiseSchedule, *, mode: str = "code", num_steps: int = 5,
               grid=None) -> tuple[dict, Optional[float]]:
    """The scan ``smpo_invert`` runs for per-sample t [B]: ({t_src, t_tgt, t_call, active}, each [S, B]; the
    clean level's ᾱ: 1.0, or None for the schedule's final ᾱ as the code reads it). ``active[k, b]``: sample
    b needs step k (in "code" and "paper" a prefix of the steps, longer for larger t)."""
    _check_mode(mode)
    t = jnp.asarray(t, jnp.int32)
    batch = t.shape[0]
    if mode == "consistent":
        check_num_steps(num_steps, schedule.num_train_timesteps)
        levels = smpo_consistent_levels(t, num_steps)
        t_src, t_tgt = levels[:-1], levels[1:]
        return dict(t_src=t_src, t_tgt=t_tgt, t_call=t_tgt, active=t_tgt > t_src), 1.0
    src, tgt = _smpo_levels(schedule, num_steps, grid)
    if mode == "code":
        t_src = jnp.broadcast_to(jnp.asarray(src)[:, None], (len(src), batch))
        t_tgt = jnp.broadcast_to(jnp.asarray(tgt)[:, None], (len(src), batch))
        return dict(t_src=t_src, t_tgt=t_tgt, t_call=t_src, active=t_src < t[None, :]), None
    levels = list(tgt)
    while levels[-1] < schedule.num_train_timesteps - 1:
        levels.append(levels[-1] + schedule.num_train_timesteps // len(src))
    g = jnp.asarray(levels, jnp.int32)[:, None]
    t_tgt = jnp.minimum(g, t[None, :])
    t_src = jnp.concatenate([jnp.full((1, batch), -1, jnp.int32), t_tgt[:-1]], axis=0)  # −1: clean level
    active = jnp.concatenate([jnp.ones((1, batch), bool), g[:-1] < t[None, :]], axis=0)
    return dict(t_src=t_src, t_tgt=t_tgt, t_call=t_tgt, active=active), 1.0


def smpo_invert(eps_fn: EpsFn, x0: jax.Array, t: jax.Array, schedule: NoiseSchedule, *, cond, num_steps: int = 5,
                mode: str = "code", grid=None, renoise_steps: int = 2, average_window: Optional[tuple] = (0, 3),
                noise_regularization: Optional[NoiseRegularization] = None, keys=None, chunks: int = 1,
                row_groups: int = 1) -> SmPOInversion:
    """SmPO-Diffusion's inversion of clean latents x0 [B, H, W, C] to (x̃, τ) at per-sample t [B].

    docs/methods.md §3.

    Run by the policy with the conditional prompt, guidance 1, no gradient wanted (the caller stops it).
    In "code" and "paper" modes each step is one ReNoise iteration with both predictions averaged:
        e1 = ε(x_s, c); x' = inv(x_s, e1; s → s'); e2 = ε(x', c); x_next = inv(x_s, (e1 + e2)/2; s → s').

    mode "code" (default): as JaydenLyh/SmPO train.py runs it with diffusers 0.20.0. The grid is
      ``smpo_grid`` (SD1.5 sources −199, 1, 201, 401, 601; targets +200), a step runs for the sources
      s < t (per sample here; the reference takes sample 0's t for the batch), and BOTH predictions are
      made at the SOURCE timestep s: the UNet is literally called with t = −199 on the first step (its
      sinusoidal embedding takes the negative value; we pass it unchanged), whose ᾱ is
      ``final_alpha_cumprod`` (ᾱ_0 = 0.99915 for SD1.5). The latent lands on ``smpo_landing_timestep``:
      the grid target at or above t (but 801 for t > 801), not on t.
    mode "paper": the clean form: targets min(g, t) along g = 1, 201, ..., 801, 1001 (SD1.5), the model
      called at the TARGET of each step (ReNoise's convention), landing exactly on t. x0 is taken as
      clean data, ᾱ = 1 (not the code's ᾱ_0, which would make the step to t = 0 the identity and τ a
      multiple of x0): the first step is then x' = √ᾱ x0 + √(1−ᾱ) ε̂, the forward process with the
      model's own noise estimate.
    mode "consistent": latent, evaluation timestep and τ's ᾱ all at the sampled t. Per-sample grid
      ``smpo_consistent_levels`` (clean, ᾱ = 1, to exactly t in ``num_steps`` steps, quadratically spaced,
      so small t gets small steps), model at each step's target, ``renoise_steps`` = K ReNoise iterations
      with the ε's of iterations a <= i < b averaged (``average_window``; K = 0 is plain DDIM inversion), and
      optionally ReNoise's ``noise_regularization`` against q_sample(x0, level, ε_ref), ε_ref and rolls
      drawn from per-sample ``keys`` [B] (required then). These three arguments are ignored by "code"
      and "paper", which run SmPO's fixed one iteration.

    Target, all modes, as the code computes it: τ = (x̃ − √ᾱ_t x0)/√(1−ᾱ_t) with ᾱ at the SAMPLED t
    (``noise_scheduler.alphas_cumprod[timesteps[0]]``); the policy and reference then predict at
    (x̃, ``timestep`` = t), even where the code-mode latent sits at L(t) != t.

    All samples run the same fixed-length scan; steps where a sample is done are masked, steps where all
    are done are skipped. ``grid``: optional explicit source levels of "code"/"paper" (uniform spacing
    T//len(grid)), overriding ``num_steps``.
    chunks > 1: the rows, ordered by the steps they need (within each of ``row_groups`` blocks of consecutive
    rows: a device's share), run as that many chunks one after the other, each skipping the steps none of
    its rows needs: the same result to fp32 rounding with fewer model calls where t varies
    (``row_chunks``; "code" and "paper": rows with small t need few steps).
    """
    _check_mode(mode)
    if mode == "consistent" and noise_regularization is not None and keys is None:
        raise ValueError("noise_regularization draws a reference noise and random rolls: pass per-sample keys=[B]")
    t = jnp.asarray(t, jnp.int32)
    grids, clean_alpha = smpo_steps(t, schedule, mode=mode, num_steps=num_steps, grid=grid)
    scan = dict(renoise_steps=1, average_window=(0, 2), clean_alpha=clean_alpha)
    if mode == "consistent":
        scan.update(renoise_steps=renoise_steps, average_window=average_window if renoise_steps > 0 else None,
                    noise_regularization=noise_regularization, keys=keys)
    if chunks == 1 and row_groups == 1:
        x_tilde, _ = _inversion_scan(guided_model(eps_fn, cond), x0, schedule, **grids, **scan)
    else:
        x_tilde = _chunked_inversion(eps_fn, cond, x0, schedule, grids, chunks, row_groups, **scan)
    a_t = _bcast(schedule.alpha_cumprod_at(t), x_tilde)
    tau = (x_tilde - jnp.sqrt(a_t) * x0.astype(jnp.float32)) / jnp.sqrt(1.0 - a_t)
    return SmPOInversion(x_tilde, tau, t)


def _chunked_inversion(eps_fn, cond, x0, schedule, grids, chunks, groups, *, keys=None, **scan):
    """``_inversion_scan`` run chunk by chunk (``lax.map``) on the rows ordered by the steps they need; each
    chunk's scan skips the steps where none of its rows is active. Returns x [B, ...] in x0's row order."""
    row_chunks.check_chunks(x0.shape[0], chunks, groups)
    order = row_chunks.most_work_first(jnp.sum(grids["active"], axis=0), groups)
    rows = lambda a: row_chunks.to_chunks(a, order, chunks)                    # noqa: E731  [B, ...] -> [C, r, ...]
    steps = lambda a: jnp.swapaxes(rows(jnp.swapaxes(a, 0, 1)), 1, 2)         # noqa: E731  [S, B] -> [C, S, r]

    def one_chunk(xs):
        x0_c, cond_c, keys_c, grids_c = xs
        x, _ = _inversion_scan(guided_model(eps_fn, cond_c), x0_c, schedule, keys=keys_c, **grids_c, **scan)
        return x

    out = jax.lax.map(one_chunk, (rows(x0), jax.tree_util.tree_map(rows, cond),
                                  None if keys is None else rows(keys), {k: steps(v) for k, v in grids.items()}))
    return row_chunks.from_chunks(out, order)
