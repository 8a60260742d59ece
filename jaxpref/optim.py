"""Optimizers and learning-rate schedules from config (optax), and the EMA rule of Diffusion-DRO."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant / cosine / linear decay to 0.

    cfg: ``config.optimizer`` (lr, warmup_steps, schedule, decay_steps).
    """
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.decay_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}: supported {SCHEDULES}")
    if cfg.warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping, then the optimizer. cfg: ``config.optimizer``.

    The clip really clips (the DRO reference's is a no-op): ``optax.clip_by_global_norm`` rescales the
    whole gradient to norm ``grad_clip`` before the optimizer sees it; ``grad_clip <= 0`` disables it.
    """
    lr = learning_rate_schedule(cfg)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        # transformers.Adafactor(scale_parameter=False, relative_step=False), what the Diffusion-DPO and SmPO
        # SDXL scripts train with: factored second moments (decay 0.8), update RMS clipped to 1, no momentum,
        # no parameter-scale multiplier, weight decay decoupled and scaled by the learning rate (as adamw's).
        opt = optax.chain(optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30), optax.clip_by_block_rms(1.0),
                          optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(lr))
    elif cfg.name == "sgd":
        opt = optax.sgd(lr)
    else:
        raise ValueError(f"config.optimizer.name={cfg.name!r}: supported {OPTIMIZERS}")
    if cfg.grad_clip and cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def ema_decay(step, max_decay: float = 0.9999):
    """Diffusion-DRO's EMA decay min((1 + s) / (10 + s), max_decay), s = updates done before this one."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum((1.0 + step) / (10.0 + step), max_decay)


def ema_update(ema_params, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema_params, params)
