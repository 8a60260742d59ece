"""What every preference method shares: per-pair randomness, the denoising error of policy and
reference, captions with prompt dropout, latents drawn from the VAE posterior, DPO-style forward noise.

A method subclasses ``Method`` and fills in the small interface the generic train step
(``jaxpref.step``) calls:

  init_state(params, text_shape, latent_shape) -> its own state (a pytree) or None
  begin_micro_step(method_state, params, micro_count) -> method_state      (e.g. refresh a sampling copy)
  loss(params, frozen, micro, rng, method_state) -> (loss, (metrics, method_state))

and declares what the data feed must serve (``data``: preference "pairs" or "experts";
``pair_order``; ``needs_rewards``) and how its state is sharded (``state_sharding_rules``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import lora, objectives

# Per-pair randomness: each pair draws from its own key (fold_in(step rng, pair index)), so a pair's t,
# ε and dropout do not depend on the micro-batch split or the mesh: accumulating 4 micro-batches equals
# one step on the whole batch, and 8 devices equal 1.
DROPOUT, POSTERIOR, TIMESTEP, NOISE, START = range(5)


def pair_keys(rng, num_pairs: int):
    """[num_pairs] raw uint32 keys, key i = fold_in(rng, i)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_pairs, dtype=jnp.uint32))


def draw(keys, purpose: int, fn):
    """fn(key) per pair with the pair's key for ``purpose``: [B, ...]."""
    return jax.vmap(lambda k: fn(jax.random.fold_in(k, purpose)))(keys)


def sample_latents(keys, mean, std, scaling_factor: float, sample_posterior: bool = True):
    """x0 = scale · (mean + std · n): a fresh posterior sample per step, as the references draw it."""
    mean = mean.astype(jnp.float32)
    if not sample_posterior:
        return scaling_factor * mean
    noise = draw(keys, POSTERIOR, lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))
    return scaling_factor * (mean + std.astype(jnp.float32) * noise)


def drop_captions(input_ids, keys, dropout: float, null_ids):
    """Prompt dropout: with probability ``dropout`` a pair's caption becomes "" (its tokens ``null_ids``)."""
    if dropout <= 0:
        return input_ids
    drop = draw(keys, DROPOUT, lambda k: jax.random.bernoulli(k, dropout))
    return jnp.where(drop[:, None], jnp.asarray(null_ids)[None, :], input_ids)


def encode_captions(text_encoder, text_params, input_ids, keys, dropout: float, null_ids):
    """Caption embeddings with prompt dropout. input_ids: [B, L]; null_ids: [L]. Returns [B, L, D] fp32,
    no gradient."""
    input_ids = drop_captions(input_ids, keys, dropout, null_ids)
    emb = text_encoder.apply({"params": text_params}, input_ids)
    return jax.lax.stop_gradient(emb.astype(jnp.float32))


def select(pred, on_true, on_false):
    """Tree-wise ``where(pred, on_true, on_false)``: keep or replace a whole params-like tree under jit."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def stack(a, b):
    """Stacks winner-side and loser-side (or expert and negative) batches for one model call."""
    return jnp.concatenate([a, b], axis=0)


class Method:
    """Binds the models and config of one run; subclasses implement ``loss`` (see the module docstring)."""

    data: ClassVar[str] = "pairs"            # what the feed serves: "pairs" (winner first) or "experts"
    pair_order: ClassVar[str] = "label"      # pairs ordered by the human "label" or by "reward"
    needs_rewards: ClassVar[bool] = False    # the batch carries reward-model scores [B, 2]
    state_sharding_rules: ClassVar[tuple] = ()  # (regex over the method state's paths, rule), first match

    def __init__(self, config, unet=None, text_encoder=None, schedule=None, *, null_ids=(),
                 scaling_factor: float = 1.0):
        """Bound to a config alone (no models) a method can still build and shard its state (eval_shape)."""
        self.config = config
        self.unet = unet
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.null_ids = np.asarray(null_ids, np.int32)
        self.scaling_factor = float(scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

    # -- The interface the train step calls.
    def init_state(self, params, *, text_shape, latent_shape) -> Any:
        """The method's own state (carried across steps and checkpointed); None when it has none."""
        return None

    def begin_micro_step(self, method_state, params, micro_count):
        """Called before each micro-batch's loss with the current φ and the micro-step count."""
        return method_state

    def loss(self, params, frozen, micro, rng, method_state):
        """(loss, (metrics, method_state)) of one micro-batch; differentiated with respect to params."""
        raise NotImplementedError

    # -- Pieces the methods share.
    def eps(self, params, x, t, text):
        """ε(x, t, c) in the module's compute dtype, returned as fp32. x: [B, h, w, c], t: [B]. ``params``: a
        UNet param tree or a LoRA policy (``lora.LoraParams``)."""
        return lora.apply(self.unet, params, x, t, text).astype(jnp.float32)

    def eps_fn(self, params):
        """A no-gradient ``eps_fn(x, t, cond)`` for the samplers and inversion in ``jaxpref.diffusion``."""
        params = lora.without_dropout(jax.lax.stop_gradient(params))
        return lambda x, t, cond: self.eps(params, x, t, cond)

    def errors(self, params, ref_params, x, t, text, target):
        """Policy and reference per-sample errors on one stacked batch (one UNet call each)."""
        err = objectives.denoising_error(self.eps(params, x, t, text), target)
        ref_pred = jax.lax.stop_gradient(self.eps(ref_params, x, t, text))
        return err, objectives.denoising_error(ref_pred, target)

    def captions(self, frozen, micro):
        return encode_captions(self.text_encoder, frozen["text"], micro["input_ids"], micro["keys"],
                               self.config.prompt_dropout, self.null_ids)

    def latents(self, micro):
        return sample_latents(micro["keys"], micro["latent_mean"], micro["latent_std"], self.scaling_factor,
                              self.config.sample_posterior)

    def timesteps(self, keys):
        return draw(keys, TIMESTEP, lambda k: jax.random.randint(k, (), 0, self.num_train_timesteps))

    def noised_pairs(self, keys, x0_2, t2):
        """DPO's forward noise on the [2B] stack (winners, then losers): one ε per pair, shared by its two
        images. Returns (x_t, ε) both [2B, h, w, c]."""
        noise = draw(keys, NOISE, lambda k: jax.random.normal(k, x0_2.shape[1:], jnp.float32))
        noise2 = stack(noise, noise)
        return self.schedule.q_sample(x0_2, t2, noise2), noise2

    def pairs(self, frozen, micro):
        """A micro-batch of preference pairs stacked for one model call: (text2 [2B, L, D], x0_2 [2B, h, w, c],
        t2 [2B]), winners first, one t per pair."""
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)                                   # [B, 2, h, w, c], winner first
        t = self.timesteps(micro["keys"])
        return stack(text, text), stack(x0[:, 0], x0[:, 1]), stack(t, t)
