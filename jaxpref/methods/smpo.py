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

from jaxpref import diffusion, objectives
from jaxpref.methods.base import INVERTED, NOISE, Method, draw, stack

INVERSIONS = (*diffusion.SMPO_MODES, "none")  # "none": forward noise, the ablation without inversion
INVERSION_MODELS = ("policy", "reference")    # the UNet that inverts (``smpo.inversion_model``)


T_BUCKETS = (0, 250, 500, 750)  # diagnostics by training timestep: [0, 250), [250, 500), ...


class SmPO(Method):
    pair_order = "reward"
    needs_rewards = True

    def init_state(self, params, *, text_shape, latent_shape):
        """The micro-step count: the inversion diagnostics run on the loop's log steps only."""
        return jnp.zeros((), jnp.int32)

    def begin_micro_step(self, micro_count_state, params, micro_count):
        return jnp.asarray(micro_count, jnp.int32)

    def loss(self, params, frozen, micro, rng, micro_count):
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
        metrics.update(self.diagnostics(params, micro, x0_2, t2, text2, tau, err, micro_count))
        return loss, (metrics, micro_count)

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

    def diagnostics(self, params, micro, x0_2, t2, text2, tau, err, micro_count) -> dict:
        """How noise-like the targets are and how well the policy predicts them, by t bucket: mean τ²
        (forward noise: 1), the policy's error on (x̃, t) against τ, and on the same x0 forward-noised at
        the same t against ε (an inversion that is consistent keeps the first near the second). The
        forward-noise call runs on log steps only (NaN on the others, which the loop does not log)."""
        tau_sq = jnp.mean(jnp.square(tau), axis=(1, 2, 3))
        err = jax.lax.stop_gradient(err)
        if self.config.smpo.inversion == "none":
            noise_err = err
        else:
            step = micro_count // self.config.grad_accum
            every = max(int(self.config.log.every), 1)
            x_t, noise = self.noised_pairs(micro["keys"], x0_2, t2)
            forward = lambda: objectives.denoising_error(self.eps(jax.lax.stop_gradient(params), x_t, t2, text2),
                                                         noise)
            noise_err = jax.lax.cond(((step + 1) % every == 0) | (step == 0), forward,
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
            keys=stack(noise_keys, noise_keys) if regularize else None)
