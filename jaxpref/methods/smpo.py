"""SmPO-Diffusion (Lu et al., ICML 2025): reward-smoothed preferences on inverted latents.

  p      = σ(r'_w − r'_l),  r' = (r − r_min) / (r_max − r_min)     smoothed label from offline rewards
  x̃, τ  = inversion of x0 to level t with the policy (no gradient)  (``diffusion.smpo_invert``)
           or, ``smpo.inversion_model="reference"``, with the frozen reference
  Δθ     = err(θ, x̃_w, t, τ_w) − err(θ, x̃_l, t, τ_l);  Δref likewise
  loss   = −log σ(−β/2 · γ(2p − 1) · (Δθ − Δref))                    (``objectives.smpo_loss``)

``smpo.inversion`` picks the inversion (docs/methods.md §3): "code" (the released code), "paper", "consistent"
(latent, evaluation timestep and τ at one noise level), or "none", DPO's forward noise (the paper's ablation).
``smpo.inversion_fraction`` < 1 trains that share of the pairs (drawn per pair, both images alike) on inverted
latents and the others on forward noise at the same t.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpref import diffusion, objectives
from jaxpref.diffusion import row_chunks
from jaxpref.errors import ConfigError
from jaxpref.methods.base import INVERTED, NOISE, Method, draw, stack

INVERSIONS = (*diffusion.SMPO_MODES, "none")  # "none": forward noise, the ablation without inversion
INVERSION_MODELS = ("policy", "reference")    # the UNet that inverts (``smpo.inversion_model``)


T_BUCKETS = (0, 250, 500, 750)


def inversion_scan_steps(s, schedule=None) -> int:
    """Steps of the inversion scan ``smpo_invert`` runs (``diffusion.smpo_steps``' length; 0 without
    inversion, "none": forward noise, as DPO)."""
    if s.inversion == "none":
        return 0
    t = np.zeros((1,), np.int32)
    steps = diffusion.smpo_steps(t, schedule or diffusion.NoiseSchedule(), mode=s.inversion,
                                 num_steps=s.inversion_steps)[0]
    return int(steps["active"].shape[0])


def inversion_rows(s, micro_pairs: int, schedule=None, groups=None) -> float:
    """Expected image rows the inversion scan of one micro-batch computes, summed over its steps, for t
    uniform over the schedule's training timesteps (default: SD's): chunks skip the steps none of their rows
    needs (``smpo.inversion_chunks``), ordered within ``groups`` blocks (default: per device, as the step
    splits them). The [2B] stack is winners then losers, so one block holds each pair's t twice, and with
    an even number of blocks block g + G/2 repeats block g's t (same steps run, twice the rows)."""
    if s.inversion == "none":
        return 0.0
    schedule = schedule or diffusion.NoiseSchedule()
    t = np.arange(schedule.num_train_timesteps)
    active = np.asarray(diffusion.smpo_steps(t, schedule, mode=s.inversion, num_steps=s.inversion_steps)[0]["active"])
    rows, chunks = 2 * micro_pairs, s.inversion_chunks
    groups = _row_groups(rows, chunks) if groups is None else groups
    p = active.mean(axis=1)
    if groups == 1:
        return row_chunks.expected_rows_run(p, rows, chunks, 1, rows_per_draw=2)
    if groups % 2 == 0:
        return 2 * row_chunks.expected_rows_run(p, micro_pairs, chunks, groups // 2)
    return row_chunks.expected_rows_run(p, rows, chunks, groups)  # odd blocks straddle: taken as independent


class SmPO(Method):
    pair_order = "reward"
    needs_rewards = True
    config_section = "smpo"
    config_help = {
        "beta": "SmPO's β (> 0)",
        "gamma": "SmPO's γ scaling the smoothed preference 2p - 1 (> 0)",
        "reward_min": "reward score mapped to preference 0 (PickScore's minimum over Pick-a-Pic v2)",
        "reward_max": "reward score mapped to preference 1 (PickScore's maximum over Pick-a-Pic v2)",
        "inversion": f"one of {INVERSIONS}: 'code' as JaydenLyh/SmPO runs it; 'paper' lands exactly on t; "
                     "'consistent' keeps latent, timestep and target at one level; 'none' uses DPO's forward "
                     "noise (the inversion ablation); docs/methods.md §3",
        "inversion_steps": "inversion grid steps (the per-sample grid's steps in 'consistent')",
        "inversion_iterations": "'consistent': ReNoise iterations K per step (0 = plain DDIM inversion)",
        "inversion_window": "'consistent': average ε of iterations a <= i < b for the final update",
        "inversion_noise_regularization": "'consistent': ReNoise's noise regularisation of ε",
        "inversion_noise_shifts": "the regularisation's autocorrelation rolls: 'code' = shifts 0..H/2-1 as the "
                                  "released code (shift 0 pulls the variance to 0: strong on small latents), "
                                  "'paper' = 1..H/2 as the regulariser's formula (correlations only)",
        "inversion_model": f"the UNet that inverts, one of {INVERSION_MODELS}: 'policy' (the references: the "
                           "latents follow the current policy) or 'reference' (the frozen reference: fixed "
                           "targets per image that the policy can move away from)",
        "inversion_fraction": "share of the pairs (drawn per pair) trained on inverted latents; the others on "
                              "forward noise at the same t as 'none' (1 = all inverted, the references' form)",
        "inversion_chunks": "'code'/'paper': the micro-batch's 2B images, ordered by the inversion steps their t "
                            "needs, inverted in this many chunks, each skipping the steps none of its images needs "
                            "(1 = the whole batch while any image needs a step). Same result to fp32 rounding, "
                            "fewer UNet forwards: 'code', 5 steps, 8 pairs, uniform t: 10.0 per image whole, 8.0 "
                            "at 4 chunks, 7.6 at one pair per chunk (chunks = pairs; smaller chunks save no more); "
                            "must divide 2 x the micro-batch's pairs",
    }

    @classmethod
    def default_config(cls):
        return ml_collections.ConfigDict(dict(
            beta=2000.0, gamma=10.0,
            reward_min=objectives.PICKSCORE_MIN, reward_max=objectives.PICKSCORE_MAX,  # over Pick-a-Pic v2
            inversion="code", inversion_steps=5, inversion_iterations=2, inversion_window=(0, 3),
            inversion_noise_regularization=False, inversion_noise_shifts="code", inversion_fraction=1.0,
            inversion_model="policy", inversion_chunks=1))

    @classmethod
    def flops(cls, config, pairs, fwd, fwdbwd):
        """DPO's update plus the inversion: the expected UNet rows its masked scan computes per micro-batch
        (``inversion_rows``, t uniform) x its forwards per row and step: 2 (one ReNoise iteration) in
        "code"/"paper", 1 + ``inversion_iterations`` in "consistent"."""
        update = super().flops(config, pairs, fwd, fwdbwd)["step"]
        s = config.smpo
        per_step = 1 + (s.inversion_iterations if s.inversion == "consistent" else 1)
        micro = pairs // config.grad_accum
        inversion = config.grad_accum * inversion_rows(s, micro) * per_step * fwd
        return {"update": update, "inversion": inversion, "step": update + inversion}

    @classmethod
    def validate_config(cls, config, micro_batch):
        s = config.smpo
        if not s.beta > 0:
            raise ConfigError("smpo.beta", s.beta, "a positive KL weight (at 0 the loss is constant)")
        if not s.gamma > 0:
            raise ConfigError("smpo.gamma", s.gamma, "a positive scale of the smoothed preference")
        if s.inversion not in INVERSIONS:
            raise ConfigError("smpo.inversion", s.inversion, f"one of {INVERSIONS}")
        if s.reward_max <= s.reward_min:
            raise ConfigError("smpo.reward_max", s.reward_max, "must exceed smpo.reward_min")
        _check_inversion(s)
        _check_chunks(s, micro_batch)

    @classmethod
    def check_data(cls, config, source):
        """The rewards are mapped to preferences by [reward_min, reward_max]: refused when most of the data's
        range (its scores' min and max) lies outside, e.g. PickScore scaled by exp(logit_scale) (~100x) against
        the default cosine range, which would push every pair's preference to 0 or 1."""
        if source.reward_range is None:
            return
        lo, hi = source.reward_range
        s = config.smpo
        inside = max(0.0, min(hi, s.reward_max) - max(lo, s.reward_min))
        if hi > lo and inside < 0.5 * (hi - lo):
            raise ConfigError("smpo.reward_min", s.reward_min,
                              f"with smpo.reward_max={s.reward_max:g}, a range that holds most of the data's rewards; "
                              f"{source.name}'s span [{lo:.4g}, {hi:.4g}] (set both to its scorer's range)")

    def init_state(self, params, *, text_shape, latent_shape):
        """Whether the loop logs this update (1) or not (0): the inversion diagnostics run on logged updates."""
        return jnp.zeros((), jnp.int32)

    def begin_micro_step(self, log_flag, params, micro_count, log_step=False):
        return jnp.asarray(log_step, jnp.int32)

    def loss(self, params, frozen, micro, rng, log_flag):
        cfg = self.config.smpo
        text2, x0_2, t2 = self.pairs(frozen, micro)
        b = x0_2.shape[0] // 2
        if cfg.inversion == "none":
            x_inv, tau = self.noised_pairs(micro["keys"], x0_2, t2)
        else:
            inverter = params if cfg.inversion_model == "policy" else frozen["ref"]
            inverted = jax.lax.stop_gradient(self.invert(inverter, micro["keys"], x0_2, t2, text2))
            x_inv, tau, t2 = self.mix_forward_noise(micro["keys"], inverted, x0_2, t2)
        err, ref_err = self.errors(params, frozen["ref"], x_inv, t2, text2, tau)
        rewards = micro["rewards"].astype(jnp.float32)
        prob_w = objectives.smpo_preference(rewards[:, 0], rewards[:, 1], cfg.reward_min, cfg.reward_max)
        loss, metrics = objectives.smpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.beta, prob_w,
                                             cfg.gamma)
        metrics.update(self.diagnostics(params, micro, x0_2, t2, text2, tau, err, log_flag))
        return loss, (metrics, log_flag)

    def mix_forward_noise(self, keys, inverted, x0_2, t2):
        """(x̃, τ, t) of the inversion for a share ``smpo.inversion_fraction`` of the pairs, drawn per pair;
        the others forward-noised at their sampled t with τ = ε, as "none" trains them."""
        fraction = float(self.config.smpo.inversion_fraction)
        if fraction >= 1.0:
            return inverted
        x_t, noise = self.noised_pairs(keys, x0_2, t2)
        use = draw(keys, INVERTED, lambda k: jax.random.uniform(k) < fraction)
        use2 = stack(use, use)
        pick = lambda a, b: jnp.where(use2.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        return pick(inverted.latents, x_t), pick(inverted.target, noise), pick(inverted.timestep, t2)

    def diagnostics(self, params, micro, x0_2, t2, text2, tau, err, log_flag) -> dict:
        """How noise-like the targets are and how well the policy predicts them, by t bucket: mean τ²
        (forward noise: 1), the policy's error on (x̃, t) against τ, and on the same x0 forward-noised at
        the same t against ε (an inversion that is consistent keeps the first near the second). The
        forward-noise call runs on log steps only (NaN on the others, which the loop does not log)."""
        tau_sq = jnp.mean(jnp.square(tau), axis=(1, 2, 3))
        err = jax.lax.stop_gradient(err)
        if self.config.smpo.inversion == "none":
            noise_err = err
        else:
            x_t, noise = self.noised_pairs(micro["keys"], x0_2, t2)
            forward = lambda: objectives.denoising_error(self.eps(jax.lax.stop_gradient(params), x_t, t2, text2),
                                                         noise)
            noise_err = jax.lax.cond(log_flag > 0, forward,
                                     lambda: jnp.full_like(err, jnp.nan))
        out = {"tau_sq": jnp.mean(tau_sq), "tau_err": jnp.mean(err), "noise_err": jnp.mean(noise_err)}
        edges = (*T_BUCKETS, self.num_train_timesteps)
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = ((t2 >= lo) & (t2 < hi)).astype(jnp.float32)
            mean = lambda v: jnp.sum(v * mask) / jnp.sum(mask)   # NaN when no pair drew a t in the bucket
            out.update({f"tau_sq/t{lo}": mean(tau_sq), f"tau_err/t{lo}": mean(err),
                        f"noise_err/t{lo}": mean(noise_err)})
        return out

    def invert(self, params, keys, x0_2, t2, text2) -> diffusion.SmPOInversion:
        """``smpo_invert`` of the [2B] stack with ``params`` (the policy's or the reference's). Noise
        regularisation ("consistent" only) draws its reference noise from each pair's forward-noise key:
        x_ref = q_sample(x0, t, ε) with the ε that "none" would use, shared by the pair's two images."""
        cfg = self.config.smpo
        regularize = cfg.inversion == "consistent" and cfg.inversion_noise_regularization
        noise_keys = draw(keys, NOISE, lambda k: k)
        return diffusion.smpo_invert(
            self.eps_fn(params), x0_2, t2, self.schedule, cond=text2, mode=cfg.inversion,
            num_steps=cfg.inversion_steps, renoise_steps=cfg.inversion_iterations,
            average_window=tuple(cfg.inversion_window),
            noise_regularization=diffusion.NoiseRegularization(
                min_shift=diffusion.NOISE_SHIFTS[cfg.inversion_noise_shifts]) if regularize else None,
            keys=stack(noise_keys, noise_keys) if regularize else None,
            chunks=cfg.inversion_chunks, row_groups=_row_groups(x0_2.shape[0], cfg.inversion_chunks))


def _row_groups(rows: int, chunks: int) -> int:
    """Blocks the inversion orders its rows within: one per device when the chunks split evenly over them
    (a row never leaves its device's share of the batch), else one."""
    devices = jax.device_count()
    return devices if chunks > 1 and rows % (chunks * devices) == 0 else 1


def _check_chunks(s, micro_batch: int):
    chunks = s.inversion_chunks
    if not isinstance(chunks, int) or chunks < 1:
        raise ConfigError("smpo.inversion_chunks", chunks, "a number of chunks >= 1 (1: the whole batch)")
    if chunks > 1 and s.inversion not in ("code", "paper"):
        raise ConfigError("smpo.inversion_chunks", chunks, "applies to smpo.inversion='code' or 'paper' (in "
                          "'consistent' every image needs nearly every step): use 1")
    if (2 * micro_batch) % chunks:
        raise ConfigError("smpo.inversion_chunks", chunks,
                          f"must divide the micro-batch's {2 * micro_batch} images (2 x {micro_batch} pairs)")


def _check_inversion(s):
    if not isinstance(s.inversion_steps, int) or s.inversion_steps < 1:
        raise ConfigError("smpo.inversion_steps", s.inversion_steps, "a number of grid steps >= 1")
    if s.inversion_model not in INVERSION_MODELS:
        raise ConfigError("smpo.inversion_model", s.inversion_model, f"one of {INVERSION_MODELS}")
    if not 0.0 < s.inversion_fraction <= 1.0:
        raise ConfigError("smpo.inversion_fraction", s.inversion_fraction,
                          "a share of the pairs in (0, 1] (no inversion: smpo.inversion='none')")
    if s.inversion != "consistent":
        if s.inversion_noise_regularization:
            raise ConfigError("smpo.inversion_noise_regularization", True, "applies to smpo.inversion='consistent'")
        return
    k = s.inversion_iterations
    if not isinstance(k, int) or k < 0:
        raise ConfigError("smpo.inversion_iterations", k, "a number of ReNoise iterations >= 0 (0: DDIM inversion)")
    if s.inversion_noise_shifts not in diffusion.NOISE_SHIFTS:
        raise ConfigError("smpo.inversion_noise_shifts", s.inversion_noise_shifts,
                          f"one of {tuple(diffusion.NOISE_SHIFTS)}")
    window = tuple(s.inversion_window)
    if len(window) != 2 or not all(isinstance(v, int) for v in window) or not 0 <= window[0] < window[1]:
        raise ConfigError("smpo.inversion_window", s.inversion_window,
                          "(a, b) with 0 <= a < b: iterations a <= i < b averaged")
    if k > 0 and window[1] > k + 1:
        raise ConfigError("smpo.inversion_window", s.inversion_window,
                          f"must lie within iterations 0..{k} of smpo.inversion_iterations={k}, e.g. (0, {k + 1})")
