"""MaPO (Hong et al., 2024): margin-aware preference optimisation without a reference model.

One t ~ U{0..T-1} and one ε shared by both images of a pair (as DPO), the policy alone:
  e_w, e_l = err(θ, x_w,t), err(θ, x_l,t);   score(e) = s·e / (exp(s·e) − 1),  s = ``mapo.snr_value``
  loss     = mean e_w − β · mean log σ(T · (score(e_w) − score(e_l)))           (``objectives.mapo_loss``)
T is the schedule's number of training timesteps (1000). No frozen reference enters the loss, so the run
keeps none (``uses_reference = False``; with LoRA the frozen base still serves the adapters). docs/methods.md §8.
"""
from __future__ import annotations

import ml_collections

from jaxpref import objectives
from jaxpref.errors import ConfigError
from jaxpref.methods.base import Method


class MaPO(Method):
    config_section = "mapo"
    config_help = {
        "beta": "MaPO's weight of the margin term against the winner's denoising error (the released code's "
                "beta_mapo; >= 0, 0 = SFT on the winners)",
        "snr_value": "s in the score s·e / (exp(s·e) − 1) of an image's error e (the released code's constant "
                     "snr_value; > 0)",
    }
    uses_reference = False

    @classmethod
    def default_config(cls):
        # The released code's defaults (mapo-t2i/mapo args.py: --beta_mapo 0.1, --snr_value 0.5).
        return ml_collections.ConfigDict(dict(beta=0.1, snr_value=0.5))

    @classmethod
    def validate_config(cls, config, micro_batch):
        m = config.mapo
        if not m.beta >= 0:
            raise ConfigError("mapo.beta", m.beta, "a weight >= 0 of the margin term (0: SFT on the winners)")
        if not m.snr_value > 0:
            raise ConfigError("mapo.snr_value", m.snr_value, "a positive scale of the error inside the score")
        if config.reference_path:
            raise ConfigError("reference_path", config.reference_path,
                              "MaPO is reference-free and never reads a reference UNet; leave reference_path empty")

    @classmethod
    def describe_metrics(cls):
        return ("err_w",)

    def loss(self, params, frozen, micro, rng, method_state):
        cfg = self.config.mapo
        text2, x0_2, t2 = self.pairs(frozen, micro)
        b = x0_2.shape[0] // 2
        x_t, noise2 = self.noised_pairs(micro["keys"], x0_2, t2)
        err = objectives.denoising_error(self.eps(params, x_t, t2, text2), noise2)
        loss, metrics = objectives.mapo_loss(err[:b], err[b:], cfg.beta, cfg.snr_value, self.num_train_timesteps)
        return loss, (metrics, method_state)
