"""SmPO-Diffusion (Lu et al., ICML 2025): reward-smoothed preferences on inverted latents.

  p      = σ(r'_w − r'_l),  r' = (r − r_min) / (r_max − r_min)     smoothed label from offline rewards
  x̃, τ  = inversion of x0 to level t with the policy (no gradient)  (``diffusion.smpo_invert``)
  Δθ     = err(θ, x̃_w, t, τ_w) − err(θ, x̃_l, t, τ_l);  Δref likewise
  loss   = −log σ(−β/2 · γ(2p − 1) · (Δθ − Δref))                    (``objectives.smpo_loss``)

``smpo.inversion`` picks the inversion (docs/methods.md §3): "code" (the released code), "paper", "consistent"
(latent, evaluation timestep and τ at one noise level), or "none", DPO's forward noise (the paper's ablation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref import diffusion, objectives
from jaxpref.methods.base import NOISE, Method, draw, stack

INVERSIONS = (*diffusion.SMPO_MODES, "none")  # "none": forward noise, the ablation without inversion


class SmPO(Method):
    pair_order = "reward"
    needs_rewards = True

    def loss(self, params, frozen, micro, rng, method_state):
        cfg = self.config.smpo
        text2, x0_2, t2 = self.pairs(frozen, micro)
        b = x0_2.shape[0] // 2
        if cfg.inversion == "none":
            x_inv, tau = self.noised_pairs(micro["keys"], x0_2, t2)
        else:
            x_inv, tau, t2 = jax.lax.stop_gradient(self.invert(params, micro["keys"], x0_2, t2, text2))
        err, ref_err = self.errors(params, frozen["ref"], x_inv, t2, text2, tau)
        rewards = micro["rewards"].astype(jnp.float32)
        prob_w = objectives.smpo_preference(rewards[:, 0], rewards[:, 1], cfg.reward_min, cfg.reward_max)
        loss, metrics = objectives.smpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.beta, prob_w,
                                             cfg.gamma)
        # How noise-like the targets are (forward noise: E τ² = 1) and how well the policy predicts them.
        metrics.update(tau_sq=jnp.mean(jnp.square(tau)), tau_err=jnp.mean(err))
        return loss, (metrics, method_state)

    def invert(self, params, keys, x0_2, t2, text2) -> diffusion.SmPOInversion:
        """``smpo_invert`` of the [2B] stack with the policy. Noise regularisation ("consistent" only) draws
        its reference noise from each pair's forward-noise key: x_ref = q_sample(x0, t, ε) with the ε that
        "none" would use, shared by the pair's two images."""
        cfg = self.config.smpo
        regularize = cfg.inversion == "consistent" and cfg.inversion_noise_regularization
        noise_keys = draw(keys, NOISE, lambda k: k)
        return diffusion.smpo_invert(
            self.eps_fn(params), x0_2, t2, self.schedule, cond=text2, mode=cfg.inversion,
            num_steps=cfg.inversion_steps, renoise_steps=cfg.inversion_iterations,
            average_window=tuple(cfg.inversion_window),
            noise_regularization=diffusion.NoiseRegularization() if regularize else None,
            keys=stack(noise_keys, noise_keys) if regularize else None)
