"""Diffusion-DPO (Wallace et al. 2023) on human preference pairs (c, x_w, x_l).

One t ~ U{0..T-1} and one ε shared by both images of a pair:
  x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                     for x0 ∈ {x_w, x_l}
  Δθ  = err(θ, x_w,t) − err(θ, x_l,t);  Δref likewise with the frozen reference
  loss = −log σ(−β/2 · (Δθ − Δref))             (``objectives.dpo_loss``)
"""
from __future__ import annotations

import ml_collections

from jaxpref import objectives
from jaxpref.errors import ConfigError
from jaxpref.methods.base import Method


class DPO(Method):
    config_section = "dpo"
    config_help = {"beta": "DPO's β (KL weight; the loss uses β/2); > 0 (at 0 the loss is log 2 with no gradient)"}

    @classmethod
    def default_config(cls):
        return ml_collections.ConfigDict(dict(beta=5000.0))   # Diffusion-DPO's SD1.5 setting

    @classmethod
    def validate_config(cls, config, micro_batch):
        if not config.dpo.beta > 0:
            raise ConfigError("dpo.beta", config.dpo.beta, "a positive KL weight (at 0 the loss is constant)")

    def loss(self, params, frozen, micro, rng, method_state):
        text2, x0_2, t2 = self.pairs(frozen, micro)
        b = x0_2.shape[0] // 2
        xt, noise2 = self.noised_pairs(micro["keys"], x0_2, t2)
        err, ref_err = self.errors(params, frozen["ref"], xt, t2, text2, noise2)
        loss, metrics = objectives.dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], self.config.dpo.beta)
        return loss, (metrics, method_state)
