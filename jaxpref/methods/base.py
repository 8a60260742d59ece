"""What every preference method shares: per-pair randomness, the denoising error of policy and
reference, captions with prompt dropout, latents drawn from the VAE posterior, DPO-style forward noise.

A method subclasses ``Method`` and fills in the small interface the generic train step
(``jaxpref.step``) calls:

  check_data(config, source) -> None, or ConfigError when its settings do not suit the data (the feed
                                  calls it as the data opens)
  init_state(params, text_shape, latent_shape) -> its own state (a pytree) or None
  begin_micro_step(method_state, params, micro_count, log_step) -> method_state  (e.g. refresh a sampler)
  loss(params, frozen, micro, rng, method_state) -> (loss, (metrics, method_state))

and declares what the data feed must serve (``data``: preference "pairs" or "experts";
``pair_order``; ``needs_rewards``) and how its state is sharded (``state_sharding_rules``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpref import lora, objectives
from jaxpref.models import conditioning

# Per-pair randomness: each pair draws from its own key (fold_in(step rng, pair index)), so a pair's t,
# ε and dropout do not depend on the micro-batch split or the mesh: accumulating 4 micro-batches equals
# one step on the whole batch, and 8 devices equal 1.
DROPOUT, POSTERIOR, TIMESTEP, NOISE, START, INVERTED = range(6)


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


def encode_captions(text_encoder, text_params, input_ids, keys, dropout: float, null_ids, time_ids=None):
    """The UNet's conditioning with prompt dropout, fp32, no gradient. input_ids: [B, L]; null_ids: [L].

    SD: caption embeddings [B, L, D]. SDXL: the ``conditioning`` dict with ``time_ids`` [B, 6] or [6]; a
    dropped caption is encoded as "" by both encoders and its time ids are kept, as Diffusion-DPO's and
    diffusers' SDXL training scripts do (nothing is zeroed: that is the pipelines' CFG at inference).
    """
    input_ids = drop_captions(input_ids, keys, dropout, null_ids)
    emb = text_encoder.apply({"params": text_params}, input_ids)
    emb = conditioning.with_time_ids(jax.tree_util.tree_map(lambda e: e.astype(jnp.float32), emb), time_ids)
    return jax.lax.stop_gradient(emb)


def select(pred, on_true, on_false):
    """Tree-wise ``where(pred, on_true, on_false)``: keep or replace a whole params-like tree under jit."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def stack(a, b):
    """Stacks winner-side and loser-side (or expert and negative) batches for one model call (leaf-wise
    for a pytree such as SDXL's conditioning)."""
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


class Method:
    """Binds the models and config of one run; subclasses implement ``loss`` (see the module docstring)."""

    # -- Its configuration: config_lib assembles the schema from the registry, so a method's section, help text
    # and checks live here and a new method is one file plus one registry line.
    config_section: ClassVar[str | None] = None   # its hyperparameters' section of the config ("dpo"); None: none
    config_help: ClassVar[dict] = {}               # key of its section -> one line for --print_config
    uses_reference: ClassVar[bool] = True          # keeps a frozen reference UNet (MaPO: reference-free)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """Its section's keys and defaults (empty when ``config_section`` is None)."""
        return ml_collections.ConfigDict()

    @classmethod
    def validate_config(cls, config, micro_batch: int) -> None:
        """Raises ``errors.ConfigError`` for a value of its section the run cannot use (before anything loads).
        ``micro_batch``: pairs per micro-batch, all devices together."""

    @classmethod
    def check_data(cls, config, source) -> None:
        """Raises ``errors.ConfigError`` when its settings do not suit the opened training ``source``
        (``jaxpref.data.sources.Source``: its name, kind, reward range), before anything compiles."""

    @classmethod
    def fit_config_to_batch(cls, config, micro_batch: int) -> None:
        """Adjusts its own settings in place for a batch size set by a tool (the TPU sizing, benchmarks): e.g.
        a buffer that must hold one micro-batch. ``micro_batch``: pairs per micro-batch, all devices."""

    @classmethod
    def flops(cls, config, pairs: int, fwd: float, fwdbwd: float) -> dict[str, float]:
        """Model FLOPs of one update of ``pairs`` pairs, by part, with the whole under "step" (F = ``fwd``: one
        UNet forward of one image; G = ``fwdbwd``: forward + backward). Here: the policy's forward and
        backward on the 2B winner/loser images, and the reference's forward on them where the method keeps
        one (``uses_reference``)."""
        return {"step": 2 * pairs * fwdbwd + (2 * pairs * fwd if cls.uses_reference else 0)}

    @classmethod
    def describe_metrics(cls) -> tuple[str, ...]:
        """Its metric names worth a place on the console's progress line (besides loss and grad norm)."""
        return ()

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

    def begin_micro_step(self, method_state, params, micro_count, log_step=False):
        """Called before each micro-batch's loss with the current φ, the micro-step count and whether the loop
        logs this update (a traced bool: diagnostics worth computing on logged updates only)."""
        return method_state

    def loss(self, params, frozen, micro, rng, method_state):
        """(loss, (metrics, method_state)) of one micro-batch; differentiated with respect to params."""
        raise NotImplementedError

    # -- Pieces the methods share.
    def eps(self, params, x, t, text):
        """ε(x, t, c) in the module's compute dtype, returned as fp32. x: [B, h, w, c], t: [B]; text: the
        conditioning pytree (``jaxpref.models.conditioning``). ``params``: a UNet param tree or a LoRA policy
        (``lora.LoraParams``)."""
        args, kwargs = conditioning.unet_inputs(text)
        return lora.apply(self.unet, params, x, t, *args, **kwargs).astype(jnp.float32)

    def eps_fn(self, params):
        """A no-gradient ``eps_fn(x, t, cond)`` for the samplers and inversion in ``jaxpref.diffusion``."""
        params = lora.without_dropout(jax.lax.stop_gradient(params))
        return lambda x, t, cond: self.eps(params, x, t, cond)

    def errors(self, params, ref_params, x, t, text, target):
        """Policy and reference per-sample errors on one stacked batch (one UNet call each, or with
        ``lora.fuse_reference_forward`` one call on both: the LoRA policy's base is the reference)."""
        if self.config.lora.get("fuse_reference_forward", False):
            return self.fused_errors(params, x, t, text, target)
        err = objectives.denoising_error(self.eps(params, x, t, text), target)
        with jax.named_scope("reference"):  # names its kernels in a profile
            ref_pred = jax.lax.stop_gradient(self.eps(ref_params, x, t, text))
        return err, objectives.denoising_error(ref_pred, target)

    def fused_errors(self, params: lora.LoraParams, x, t, text, target):
        """``errors`` of a LoRA policy from one UNet call on [x; x]: the base kernels are read once and the
        LoRA branches run on the policy's rows only. The backward pass still runs through both halves."""
        n = x.shape[0]
        both = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
        args, kwargs = conditioning.unet_inputs(jax.tree_util.tree_map(both, text))
        pred = lora.apply(self.unet, params, both(x), both(t), *args, policy_rows=n, **kwargs).astype(jnp.float32)
        err = objectives.denoising_error(pred[:n], target)
        return err, objectives.denoising_error(jax.lax.stop_gradient(pred[n:]), target)

    def captions(self, frozen, micro, time_ids=None):
        """The conditioning of the micro-batch's captions; SDXL's time ids [B, 6] default to ``time_ids``."""
        return encode_captions(self.text_encoder, frozen["text"], micro["input_ids"], micro["keys"],
                               self.config.prompt_dropout, self.null_ids,
                               self.time_ids(micro) if time_ids is None else time_ids)

    def time_ids(self, micro):
        """SDXL's per-image time ids: the batch's own (``time_ids`` [B, 6], or [B, 2, 6] for pairs, from the
        crop each image was cut with) or, when the feed has none, ``default_time_ids`` of the resolution."""
        if "time_ids" in micro:
            return micro["time_ids"]
        return conditioning.default_time_ids(self.config.data.resolution)

    def unconditional(self, frozen, cond):
        """CFG's unconditional input for ``cond``'s batch (``conditioning.unconditional``), no gradient."""
        return jax.lax.stop_gradient(
            conditioning.unconditional(self.text_encoder, frozen["text"], self.null_ids, cond))

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
        """A micro-batch of preference pairs stacked for one model call: (text2 [2B, L, D] or SDXL's dict of
        [2B, ...], x0_2 [2B, h, w, c], t2 [2B]), winners first, one t per pair."""
        ids = jnp.asarray(self.time_ids(micro))
        if ids.ndim == 3:  # SDXL, each image of a pair with its own crop: one caption encoding, two time ids
            text = self.captions(frozen, micro, ids[:, 0])
            text2 = stack(text, conditioning.with_time_ids(text, ids[:, 1]))
        else:
            text = self.captions(frozen, micro)
            text2 = stack(text, text)
        x0 = self.latents(micro)                                   # [B, 2, h, w, c], winner first
        t = self.timesteps(micro["keys"])
        return text2, stack(x0[:, 0], x0[:, 1]), stack(t, t)
