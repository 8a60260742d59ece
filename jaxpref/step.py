"""The one train step for DPO, DRO and SmPO: a pure function ``train_step(state, batch, rng, frozen)``.

Gradient accumulation is a ``lax.scan`` over micro-batches inside the step; the update is skipped
(params and optimizer state unchanged) when the loss or the gradient is not finite. The caller jits it
(``jaxpref.sharding.jit_train_step`` adds in/out shardings and donates the state).

Batch layout (leading axis: pairs of the whole update, ``config.batch_size`` of them):
  input_ids      [B, L] int32       caption tokens
  latent_mean    [B, 2, h, w, c]    VAE posterior mean (DPO/SmPO: winner first); [B, h, w, c] for DRO
  latent_std     like latent_mean   VAE posterior std (x0 = scale · (mean + std · n) per step)
  rewards        [B, 2]             SmPO only: reward-model scores of (winner, loser)
``frozen`` holds what never trains: ``{'ref': reference UNet params, 'text': text encoder params}``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpref import objectives, optim
from jaxpref import diffusion

OBJECTIVES = ("dpo", "dro", "smpo")


@flax.struct.dataclass
class NegativesBuffer:
    """Diffusion-DRO's replay buffer: the newest trajectories of the sampling copy θ, with their prompts.

    One row per trajectory: the caption embedding and expert latent it was generated for, and every
    step's (t_k, x_k, ε_θ(x_k)). Rows are overwritten oldest first; ``filled`` counts valid rows.
    """
    text: jax.Array        # [N, L, D]
    x0: jax.Array          # [N, h, w, c] expert latent paired with the row's prompt
    timesteps: jax.Array   # [N, S] int32
    latents: jax.Array     # [N, S, h, w, c]
    eps: jax.Array         # [N, S, h, w, c]
    filled: jax.Array      # [] int32
    cursor: jax.Array      # [] int32, next row to overwrite


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # optimizer updates attempted (skipped ones included)
    params: Any                     # policy φ, fp32 master copy
    opt_state: Any
    ema_params: Any = None          # EMA of φ (DRO's decay rule) when config.ema.enabled
    sampler_params: Any = None      # DRO's stale sampling copy θ when config.dro.refresh_every > 0
    negatives: Any = None           # NegativesBuffer for DRO
    skipped: jax.Array = None       # updates skipped for a non-finite loss or gradient


# ---------------------------------------------------------------------------------------------
# State.

def empty_negatives_buffer(size: int, text_shape, latent_shape, num_steps: int) -> NegativesBuffer:
    """An empty buffer of ``size`` trajectories. text_shape: (L, D); latent_shape: (h, w, c)."""
    return NegativesBuffer(
        text=jnp.zeros((size, *text_shape), jnp.float32),
        x0=jnp.zeros((size, *latent_shape), jnp.float32),
        timesteps=jnp.zeros((size, num_steps), jnp.int32),
        latents=jnp.zeros((size, num_steps, *latent_shape), jnp.float32),
        eps=jnp.zeros((size, num_steps, *latent_shape), jnp.float32),
        filled=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
    )


def init_train_state(params, optimizer: optax.GradientTransformation, config, *, text_shape=None,
                     latent_shape=None) -> TrainState:
    """The initial state from fp32 policy params (usually a copy of the reference)."""
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    negatives = sampler_params = None
    if config.objective == "dro":
        negatives = empty_negatives_buffer(config.dro.buffer_size, text_shape, latent_shape,
                                           config.dro.num_inference_steps)
        if config.dro.refresh_every > 0:
            sampler_params = params
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=params if config.ema.enabled else None,
        sampler_params=sampler_params,
        negatives=negatives,
        skipped=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# Pieces of the loss.

def split_micro_batches(batch, num_micro: int):
    """[B, ...] -> [num_micro, B / num_micro, ...], row r going to micro-batch r % num_micro.

    Keeping the pair axis outermost preserves a data-axis sharding of the leading dimension.
    """
    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree_util.tree_map(split, batch)


# Per-pair randomness: each pair draws from its own key (fold_in(step rng, pair index)), so a pair's t,
# ε and dropout do not depend on the micro-batch split or the mesh: accumulating 4 micro-batches equals
# one step on the whole batch, and 8 devices equal 1.
_DROPOUT, _POSTERIOR, _TIMESTEP, _NOISE, _START = range(5)


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
    noise = draw(keys, _POSTERIOR, lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))
    return scaling_factor * (mean + std.astype(jnp.float32) * noise)


def encode_captions(text_encoder, text_params, input_ids, keys, dropout: float, null_ids):
    """Caption embeddings with prompt dropout: with probability ``dropout`` a caption becomes "".

    input_ids: [B, L]; null_ids: [L] tokens of "". Returns [B, L, D] fp32 (no gradient).
    """
    if dropout > 0:
        drop = draw(keys, _DROPOUT, lambda k: jax.random.bernoulli(k, dropout))
        input_ids = jnp.where(drop[:, None], jnp.asarray(null_ids)[None, :], input_ids)
    emb = text_encoder.apply({"params": text_params}, input_ids)
    return jax.lax.stop_gradient(emb.astype(jnp.float32))


class Objective:
    """Binds the models and config of one run; ``loss(params, frozen, micro, rng, aux)`` per micro-batch."""

    def __init__(self, config, unet, text_encoder, schedule, *, null_ids, scaling_factor: float):
        self.config = config
        self.unet = unet
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.null_ids = np.asarray(null_ids, np.int32)
        self.scaling_factor = float(scaling_factor)
        self.num_train_timesteps = int(schedule.num_train_timesteps)

    def eps(self, params, x, t, text):
        """ε(x, t, c) in the module's compute dtype, returned as fp32. x: [B, h, w, c], t: [B]."""
        return self.unet.apply({"params": params}, x, t, text).astype(jnp.float32)

    def eps_fn(self, params):
        """A no-gradient ``eps_fn(x, t, cond)`` for the samplers and inversion in ``jaxpref.diffusion``."""
        params = jax.lax.stop_gradient(params)
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
        return draw(keys, _TIMESTEP, lambda k: jax.random.randint(k, (), 0, self.num_train_timesteps))

    def noised_pairs(self, keys, x0_2, t2):
        """DPO's forward noise on the [2B] stack (winners, then losers): one ε per pair, shared by its two
        images. Returns (x_t, ε) both [2B, h, w, c]."""
        noise = draw(keys, _NOISE, lambda k: jax.random.normal(k, x0_2.shape[1:], jnp.float32))
        noise2 = _pair(noise, noise)
        return self.schedule.q_sample(x0_2, t2, noise2), noise2

    # -- Diffusion-DPO (METHODS §1): one t and one ε shared by both images of a pair.
    def dpo(self, params, frozen, micro, rng, aux):
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)                                   # [B, 2, h, w, c], winner first
        b = x0.shape[0]
        t = self.timesteps(micro["keys"])
        t2, text2 = _pair(t, t), _pair(text, text)
        xt, noise2 = self.noised_pairs(micro["keys"], _pair(x0[:, 0], x0[:, 1]), t2)
        err, ref_err = self.errors(params, frozen["ref"], xt, t2, text2, noise2)
        loss, metrics = objectives.dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], self.config.dpo.beta)
        return loss, (metrics, aux)

    # -- SmPO-Diffusion (METHODS §3): ReNoise-inverted latents instead of forward noise, smoothed labels.
    def smpo(self, params, frozen, micro, rng, aux):
        cfg = self.config.smpo
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)
        b = x0.shape[0]
        t = self.timesteps(micro["keys"])
        t2, text2, x0_2 = _pair(t, t), _pair(text, text), _pair(x0[:, 0], x0[:, 1])
        if cfg.inversion == "none":  # the ablation: DPO's forward noise, one ε shared by the pair
            x_inv, tau = self.noised_pairs(micro["keys"], x0_2, t2)
        else:
            x_inv, tau = diffusion.smpo_invert(self.eps_fn(params), x0_2, t2, self.schedule, cond=text2,
                                               mode=cfg.inversion, num_steps=cfg.inversion_steps)
            x_inv, tau = jax.lax.stop_gradient(x_inv), jax.lax.stop_gradient(tau)
        err, ref_err = self.errors(params, frozen["ref"], x_inv, t2, text2, tau)
        rewards = micro["rewards"].astype(jnp.float32)
        prob_w = objectives.smpo_preference(rewards[:, 0], rewards[:, 1], cfg.reward_min, cfg.reward_max)
        loss, metrics = objectives.smpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.beta, prob_w,
                                             cfg.gamma)
        return loss, (metrics, aux)

    # -- Diffusion-DRO (METHODS §2): experts vs the sampling copy's own online negatives.
    def dro(self, params, frozen, micro, rng, aux):
        cfg = self.config.dro
        sampler_params, buffer = aux
        if sampler_params is None:  # θ = φ at sampling time (refreshed every update, the default)
            sampler_params = params
        k_gen, k_pick = jax.random.split(rng)
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)
        buffer = self.refill_negatives(buffer, sampler_params, frozen, text, x0, micro["keys"], k_gen)
        text_n, x0_n, t_n, x_n, eps_n, keys_n = self.pick_negatives(buffer, k_pick, micro["keys"])
        if cfg.expert_timestep == "shared":  # the reference code noises the expert at the negative's t_k
            t_e = t_n
        else:
            t_e = self.timesteps(keys_n)
        noise = draw(keys_n, _NOISE, lambda k: jax.random.normal(k, x0_n.shape[1:], jnp.float32))
        x_e = self.schedule.q_sample(x0_n, t_e, noise)
        b = x_e.shape[0]
        err, ref_err = self.errors(params, frozen["ref"], _pair(x_e, x_n), _pair(t_e, t_n), _pair(text_n, text_n),
                                   _pair(noise, eps_n))
        loss, metrics = objectives.dro_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], cfg.margin)
        metrics["buffer_filled"] = buffer.filled.astype(jnp.float32)
        return loss, (metrics, (aux[0], buffer))

    def refill_negatives(self, buffer: NegativesBuffer, sampler_params, frozen, text, x0, keys,
                         rng) -> NegativesBuffer:
        """Samples one trajectory per ``steps_per_trajectory`` pairs with θ and writes them to the buffer.

        DPM-Solver++ (20 steps, guidance 1.0 by default) on the perturbed grid 950+p, ..., 0+p with one
        offset p per trajectory, so training timesteps are uniform on 0..999 (METHODS §2). x_T is drawn
        from the first pair's key of each trajectory.
        """
        cfg = self.config.dro
        n_traj = text.shape[0] // cfg.steps_per_trajectory
        text, x0, keys = text[:n_traj], x0[:n_traj], keys[:n_traj]
        grid = diffusion.dro_timestep_grid(rng, n_traj, cfg.num_inference_steps, self.num_train_timesteps)
        x_T = draw(keys, _START, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        uncond = None
        if cfg.guidance_scale != 1.0:
            null = jnp.broadcast_to(jnp.asarray(self.null_ids)[None], (n_traj, self.null_ids.shape[0]))
            uncond = jax.lax.stop_gradient(
                self.text_encoder.apply({"params": frozen["text"]}, null).astype(jnp.float32))
        _, traj = diffusion.sample(self.eps_fn(sampler_params), x_T, self.schedule, sampler=cfg.sampler,
                                   num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   rng=rng, cond=text, uncond=uncond, timesteps=grid, return_trajectory=True)
        size = buffer.x0.shape[0]
        rows = (buffer.cursor + jnp.arange(n_traj)) % size
        put = lambda dst, src: dst.at[rows].set(jax.lax.stop_gradient(src).astype(dst.dtype))
        return buffer.replace(
            text=put(buffer.text, text), x0=put(buffer.x0, x0),
            timesteps=put(buffer.timesteps, jnp.swapaxes(traj.timesteps, 0, 1)),
            latents=put(buffer.latents, jnp.swapaxes(traj.latents, 0, 1)),
            eps=put(buffer.eps, jnp.swapaxes(traj.eps, 0, 1)),
            filled=jnp.minimum(buffer.filled + n_traj, size),
            cursor=(buffer.cursor + n_traj) % size,
        )

    def pick_negatives(self, buffer: NegativesBuffer, rng, keys):
        """Distinct valid rows, ``steps_per_trajectory`` distinct random steps of each (the reference: 1).

        Returns the rows' (text, x0, t_k, x_k, ε_θ(x_k)) and one fresh key per picked pair.
        """
        cfg = self.config.dro
        num_pairs = keys.shape[0]
        n_traj = num_pairs // cfg.steps_per_trajectory
        size, num_steps = buffer.timesteps.shape
        k_rows, k_steps = jax.random.split(rng)
        # Random priorities, rows not yet filled pushed last: the top n_traj are distinct valid rows.
        priority = jax.random.uniform(k_rows, (size,)) + (jnp.arange(size) < buffer.filled)
        rows = jax.lax.top_k(priority, n_traj)[1]
        steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps)[:cfg.steps_per_trajectory])(
            jax.random.split(k_steps, n_traj))
        rows = jnp.repeat(rows, cfg.steps_per_trajectory)
        steps = steps.reshape(-1)
        return (buffer.text[rows], buffer.x0[rows], buffer.timesteps[rows, steps], buffer.latents[rows, steps],
                buffer.eps[rows, steps], keys)

    def loss(self, params, frozen, micro, rng, aux):
        return getattr(self, self.config.objective)(params, frozen, micro, rng, aux)


# ---------------------------------------------------------------------------------------------
# The step.

def _pair(a, b):
    """Stacks winner-side and loser-side (or expert and negative) batches for one model call."""
    return jnp.concatenate([a, b], axis=0)


def _select(pred, on_true, on_false):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(config, objective: Objective, optimizer: optax.GradientTransformation,
                    learning_rate: Callable | None = None):
    """Returns the pure ``train_step(state, batch, rng, frozen) -> (state, metrics)``."""
    num_micro = config.grad_accum
    refresh_every = config.dro.refresh_every if config.objective == "dro" else 0

    def train_step(state: TrainState, batch, rng, frozen):
        def micro_step(carry, xs):
            grads, sampler_params, buffer = carry
            micro, index = xs
            micro_rng = jax.random.fold_in(rng, index)
            if refresh_every > 0:  # θ <- φ every `refresh_every` micro-steps (a stale sampling copy between)
                micro_count = state.step * num_micro + index
                sampler_params = _select(micro_count % refresh_every == 0, state.params, sampler_params)
            grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
            (loss, (metrics, (sampler_params, buffer))), g = grad_fn(state.params, frozen, micro, micro_rng,
                                                                     (sampler_params, buffer))
            grads = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32) / num_micro, grads, g)
            return (grads, sampler_params, buffer), dict(metrics, loss=loss)

        batch = dict(batch, keys=pair_keys(rng, jax.tree_util.tree_leaves(batch)[0].shape[0]))
        micro_batches = split_micro_batches(batch, num_micro)
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        carry = (zeros, state.sampler_params, state.negatives)
        if num_micro == 1:  # no loop: the scan costs compile time and buys nothing here
            first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
            (grads, sampler_params, buffer), metrics = micro_step(carry, (first, jnp.zeros((), jnp.int32)))
        else:
            (grads, sampler_params, buffer), metrics = jax.lax.scan(
                micro_step, carry, (micro_batches, jnp.arange(num_micro)))
            metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        grad_norm = optax.global_norm(grads)
        # A finite loss and gradient norm (one reduction) is the whole check: per-leaf checks of the new
        # params multiply XLA compile time several-fold for nothing (AdamW of finite grads is finite).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        params = _select(finite, new_params, state.params)
        opt_state = _select(finite, new_opt_state, state.opt_state)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = optim.ema_decay(state.step - state.skipped, config.ema.max_decay)
            ema_params = _select(finite, optim.ema_update(ema_params, params, decay), ema_params)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics.update(grad_norm=grad_norm, update_skipped=(~finite).astype(jnp.float32),
                       skipped_total=skipped.astype(jnp.float32))
        if learning_rate is not None:
            metrics["lr"] = learning_rate(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                                  sampler_params=sampler_params, negatives=buffer, skipped=skipped)
        return new_state, metrics

    return train_step
