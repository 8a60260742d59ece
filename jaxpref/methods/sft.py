"""SFT: plain denoising on the preferred image of each pair, the stage the SmPO recipe starts from.

Per pair, its preferred image x_w (the feed serves winners first) with the pair's own t ~ U{0..T-1} and ε:
  x_t  = √ᾱ_t x_w + √(1−ᾱ_t) ε
  loss = mean over pairs of ‖ε_θ(x_t, t, c) − ε‖² / (h·w·c)         (``objectives.denoising_error``)
t and ε are the ones DPO draws for the same pair (same keys), the loser is never read, and no reference
model enters the loss (docs/methods.md §6).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref import objectives
from jaxpref.methods.base import NOISE, Method, draw


class SFT(Method):
    uses_reference = False   # the loss reads the policy alone

    @classmethod
    def describe_metrics(cls):
        return ("err_w",)

    def loss(self, params, frozen, micro, rng, method_state):
        text, x0, t = self.preferred(frozen, micro)
        noise = draw(micro["keys"], NOISE, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        err = objectives.denoising_error(self.eps(params, self.schedule.q_sample(x0, t, noise), t, text), noise)
        loss = jnp.mean(err)
        return loss, ({"err_w": loss}, method_state)

    def preferred(self, frozen, micro):
        """(conditioning [B, ...], x0 [B, h, w, c], t [B]) of each pair's preferred image; SDXL's per-image
        time ids [B, 2, 6] give the winner's."""
        ids = jnp.asarray(self.time_ids(micro))
        text = self.captions(frozen, micro, ids[:, 0] if ids.ndim == 3 else ids)
        return text, self.latents(micro)[:, 0], self.timesteps(micro["keys"])
