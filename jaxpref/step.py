"""The one train step for every method: a pure function ``train_step(state, batch, rng, frozen)``.

What every method shares lives here: the state, the micro-batch scan (gradient accumulation inside the
step), gradient clipping (in the optimizer), the skip of an update whose loss or gradient is not finite
(params and optimizer state unchanged), and EMA. What a method computes comes from its module in
``jaxpref.methods``. The caller compiles it (``jaxpref.trainer.compile_train_step``).

Batch layout (leading axis: pairs of the whole update, ``config.batch_size`` of them):
  input_ids      [B, L] int32       caption tokens
  latent_mean    [B, 2, h, w, c]    VAE posterior mean (pairs: winner first); [B, h, w, c] for experts
  latent_std     like latent_mean   VAE posterior std (x0 = scale · (mean + std · n) per step)
  rewards        [B, 2]             methods with ``needs_rewards``: reward-model scores of (winner, loser)
  time_ids       [B, 2, 6] / [B, 6] SDXL only, optional: each image's (original size, crop top-left, target
                                    size); without it every image gets (res, res, 0, 0, res, res)
``frozen`` holds what never trains: ``{'ref': reference UNet params, 'text': text encoder params}``.
With ``config.lora`` the state's params are the adapters, the method sees the policy
``lora.LoraParams(base=frozen['ref'], adapters)``, and the gradient, the optimizer and EMA touch adapters only.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxpref import lora, optim
from jaxpref.methods.base import Method, pair_keys, select


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # optimizer updates attempted (skipped ones included)
    params: Any                     # policy φ, fp32 master copy
    opt_state: Any
    ema_params: Any = None          # EMA of φ (DRO's decay rule) when config.ema.enabled
    method_state: Any = None        # the method's own state (DRO: negatives buffer, sampling copy)
    skipped: jax.Array = None       # updates skipped for a non-finite loss or gradient


def init_train_state(params, optimizer: optax.GradientTransformation, config, method: Method, *,
                     text_shape=None, latent_shape=None) -> TrainState:
    """The initial state from fp32 policy params (usually a copy of the reference)."""
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=params if config.ema.enabled else None,
        method_state=method.init_state(params, text_shape=text_shape, latent_shape=latent_shape),
        skipped=jnp.zeros((), jnp.int32),
    )


def split_micro_batches(batch, num_micro: int):
    """[B, ...] -> [num_micro, B / num_micro, ...], row r going to micro-batch r % num_micro.

    Keeping the pair axis outermost preserves a data-axis sharding of the leading dimension.
    """
    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree_util.tree_map(split, batch)


LORA_DROPOUT = 7  # fold_in tag of the micro-batch rng for LoRA dropout (the methods' per-pair draws use 0..6)


def policy_params(config, params, frozen, rng):
    """The UNet params a method's loss sees: ``params`` itself, or with LoRA the base + these adapters."""
    if not config.lora.enabled:
        return params
    return lora.policy(params, frozen["ref"], config.lora, jax.random.fold_in(rng, LORA_DROPOUT))


def make_train_step(config, method: Method, optimizer: optax.GradientTransformation,
                    learning_rate: Callable | None = None):
    """Returns the pure ``train_step(state, batch, rng, frozen) -> (state, metrics)``."""
    num_micro = config.grad_accum

    def train_step(state: TrainState, batch, rng, frozen):
        def micro_step(carry, xs):
            grads, method_state = carry
            micro, index = xs
            micro_rng = jax.random.fold_in(rng, index)
            method_state = method.begin_micro_step(method_state, state.params, state.step * num_micro + index,
                                                   log_step)
            loss_fn = lambda p, *args: method.loss(policy_params(config, p, frozen, micro_rng), *args)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (metrics, method_state)), g = grad_fn(state.params, frozen, micro, micro_rng, method_state)
            grads = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32) / num_micro, grads, g)
            return (grads, method_state), dict(metrics, loss=loss)

        # The loop logs update s + 1 when it is a multiple of log.every, and the first: a method may compute
        # diagnostics on those updates only.
        log_step = ((state.step + 1) % max(int(config.log.every), 1) == 0) | (state.step == 0)
        batch = dict(batch, keys=pair_keys(rng, jax.tree_util.tree_leaves(batch)[0].shape[0]))
        micro_batches = split_micro_batches(batch, num_micro)
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        carry = (zeros, state.method_state)
        if num_micro == 1:  # no loop: the scan costs compile time and buys nothing here
            first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
            (grads, method_state), metrics = micro_step(carry, (first, jnp.zeros((), jnp.int32)))
        else:
            (grads, method_state), metrics = jax.lax.scan(
                micro_step, carry, (micro_batches, jnp.arange(num_micro)))
            # Diagnostics may be NaN in a micro-batch that lacks their case (a t bucket); the loss may not.
            metrics = {k: jnp.mean(v) if k == "loss" else jnp.nanmean(v) for k, v in metrics.items()}
        grad_norm = optax.global_norm(grads)
        # A finite loss and gradient norm (one reduction) is the whole check: per-leaf checks of the new
        # params multiply XLA compile time several-fold for nothing (AdamW of finite grads is finite).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        with jax.named_scope("optimizer"):  # names the update's kernels in a profile (config.profile)
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
        params = select(finite, new_params, state.params)
        opt_state = select(finite, new_opt_state, state.opt_state)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = optim.ema_decay(state.step - state.skipped, config.ema.max_decay)
            ema_params = select(finite, optim.ema_update(ema_params, params, decay), ema_params)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics.update(grad_norm=grad_norm, update_skipped=(~finite).astype(jnp.float32),
                       skipped_total=skipped.astype(jnp.float32))
        if learning_rate is not None:
            metrics["lr"] = learning_rate(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                                  method_state=method_state, skipped=skipped)
        return new_state, metrics

    return train_step
