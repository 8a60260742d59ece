"""Diffusion-KTO (Li et al., NeurIPS 2024): per-image binary feedback and the Kahneman-Tversky value.

A preference pair gives two unpaired examples: its chosen image desirable, its rejected image undesirable.
Each image draws its own t ~ U{0..T-1}, ε and prompt dropout, as the released code trains single images:
  x_t  = √ᾱ_t x0 + √(1−ᾱ_t) ε;   g = err(ref, x_t) − err(θ, x_t)     (the implicit log-likelihood ratio)
  z    = max(0, mean g over the micro-batch's 2B images, all devices together), held constant
  loss = mean λ_y (1 − σ(y β (g − z))),  y = +1 desirable, −1 undesirable     (``objectives.kto_loss``)
The reference point z is the released code's default estimator (``--bce_offset none``): the batch mean of
the matched images' own log-ratios, reduced over every process of a micro-step and clipped at 0; it is not
KTO's mismatched-prompt estimate (docs/methods.md §7).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxpref import objectives
from jaxpref.errors import ConfigError
from jaxpref.methods.base import NOISE, Method, draw, encode_captions, stack

SECOND_IMAGE = 6  # fold_in tag: a pair's rejected image draws from its own key (base.py's draws use tags 0..5)


def image_keys(pair_keys):
    """[2B] keys, one per image: the chosen images keep their pair's key, the rejected draw from a key of
    their own, so the two images of a pair share no t, ε or dropout."""
    second = jax.vmap(lambda k: jax.random.fold_in(k, SECOND_IMAGE))(pair_keys)
    return stack(pair_keys, second)


class KTO(Method):
    config_section = "kto"
    config_help = {
        "beta": "Diffusion-KTO's β scaling the log-likelihood ratio inside σ (> 0; the loss uses β, not β/2)",
        "lambda_desirable": "λ_D, the weight of a desirable (chosen) image's loss (>= 0)",
        "lambda_undesirable": "λ_U, the weight of an undesirable (rejected) image's loss (>= 0)",
    }

    @classmethod
    def default_config(cls):
        # The released code's defaults (--beta_dpo 1000, --lambda_d_kto 1, --lambda_u_kto 1).
        return ml_collections.ConfigDict(dict(beta=1000.0, lambda_desirable=1.0, lambda_undesirable=1.0))

    @classmethod
    def validate_config(cls, config, micro_batch):
        k = config.kto
        if not k.beta > 0:
            raise ConfigError("kto.beta", k.beta, "a positive scale (at 0 the loss is constant)")
        for key in ("lambda_desirable", "lambda_undesirable"):
            if not k[key] >= 0:
                raise ConfigError(f"kto.{key}", k[key], "a weight >= 0")
        if not k.lambda_desirable + k.lambda_undesirable > 0:
            raise ConfigError("kto.lambda_desirable", k.lambda_desirable,
                              "a positive weight when kto.lambda_undesirable is 0 (both 0: nothing to train)")

    @classmethod
    def describe_metrics(cls):
        return ("reference_point",)

    def loss(self, params, frozen, micro, rng, method_state):
        cfg = self.config.kto
        keys = image_keys(micro["keys"])
        text, x0, t = self.images(frozen, micro, keys)
        noise = draw(keys, NOISE, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        x_t = self.schedule.q_sample(x0, t, noise)
        err, ref_err = self.errors(params, frozen["ref"], x_t, t, text, noise)
        desirable = jnp.arange(x0.shape[0]) < x0.shape[0] // 2
        loss, metrics = objectives.kto_loss(err, ref_err, desirable, cfg.beta, cfg.lambda_desirable,
                                            cfg.lambda_undesirable)
        return loss, (metrics, method_state)

    def images(self, frozen, micro, keys):
        """The micro-batch's 2B images as unpaired examples, chosen first: (conditioning [2B, ...], x0
        [2B, h, w, c], t [2B]), each image with its own prompt dropout and t from ``keys``."""
        ids = jnp.asarray(self.time_ids(micro))
        if ids.ndim == 3:   # SDXL, each image with its own crop's time ids
            ids = stack(ids[:, 0], ids[:, 1])
        input_ids = stack(micro["input_ids"], micro["input_ids"])
        text = encode_captions(self.text_encoder, frozen["text"], input_ids, keys, self.config.prompt_dropout,
                               self.null_ids, ids)
        x0 = self.latents(micro)
        return text, stack(x0[:, 0], x0[:, 1]), self.timesteps(keys)
