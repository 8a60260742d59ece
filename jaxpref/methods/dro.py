"""Diffusion-DRO (Wu et al., NeurIPS 2025): offline experts against the policy's own online negatives.

Per pair: an expert x0 (top-K by a reward model) with fresh ε̄ at t, and a negative built from a trajectory
that the sampling copy θ generated (docs/methods.md §2):
  Le   = err(φ, q_sample(x0, t, ε̄), t, ε̄) − err(ref, same)
  Lp   = err(φ, x_n, t_k, target_n) − err(ref, same)
  loss = mean(max(0, Le − Lp + m))                                    (``objectives.dro_loss``)

``dro.negative_target`` picks the negative: "trajectory" (the reference code) takes a recorded step
(x_k, t_k) with target ε_θ(x_k), whose error is ~0 with ~0 gradient while θ = φ; "sample" takes the
trajectory's generated x0 forward-noised at t_k with the expert's ε̄, target ε̄: the policy's own generations
become the dispreferred side of a DPO-like pair (same t and ε), with a gradient even at θ = φ.

The negatives come from a replay buffer of the newest trajectories (DPM-Solver++ on the perturbed grid
950+p, ..., 0+p, one offset p per trajectory, so t_k is uniform on 0..999); each micro-step samples
new trajectories into it and picks its negatives from it. θ = φ unless ``dro.refresh_every`` > 0 keeps
a stale copy refreshed every that many micro-steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections

from jaxpref import diffusion, lora, objectives
from jaxpref.errors import ConfigError
from jaxpref.methods.base import NOISE, START, Method, draw, select, stack

EXPERT_TIMESTEPS = ("shared", "independent")  # "shared": expert noised at the negative's t_k (reference code)
NEGATIVE_TARGETS = ("trajectory", "sample")    # "trajectory": (x_k, ε_θ(x_k)) as the reference code; "sample":
                                               # the generated x0 noised at t_k with the expert's ε̄, target ε̄


@flax.struct.dataclass
class NegativesBuffer:
    """The newest trajectories of the sampling copy θ, with their prompts.

    One row per trajectory: the caption embedding and expert latent it was generated for, every
    step's (t_k, x_k, ε_θ(x_k)) and the sampler's output. Rows are overwritten oldest first; ``filled``
    counts valid rows.
    """
    text: Any              # [N, L, D], or SDXL's conditioning dict of [N, ...]
    x0: jax.Array          # [N, h, w, c] expert latent paired with the row's prompt
    timesteps: jax.Array   # [N, S] int32
    latents: jax.Array     # [N, S, h, w, c]
    eps: jax.Array         # [N, S, h, w, c]
    final: jax.Array       # [N, h, w, c] the generated x0 (the end of the trajectory), "sample" negatives
    filled: jax.Array      # [] int32
    cursor: jax.Array      # [] int32, next row to overwrite


class PickedNegatives(NamedTuple):
    """One buffer row and step per pair (``DRO.pick_negatives``): the row's prompt, expert and generated x0,
    and the step's (t_k, x_k, ε_θ(x_k)); ``keys`` are the pairs' keys."""
    text: Any              # [B, L, D], or SDXL's conditioning dict of [B, ...]
    x0: jax.Array          # [B, h, w, c]
    timesteps: jax.Array   # [B] int32
    latents: jax.Array     # [B, h, w, c]
    eps: jax.Array         # [B, h, w, c]
    final: jax.Array       # [B, h, w, c]
    keys: jax.Array        # [B, 2] uint32


@flax.struct.dataclass
class DROState:
    negatives: NegativesBuffer
    sampler: Any = None    # the stale sampling copy θ when dro.refresh_every > 0; None: θ is φ


def empty_negatives_buffer(size: int, text_shape, latent_shape, num_steps: int) -> NegativesBuffer:
    """An empty buffer of ``size`` trajectories. text_shape: (L, D), or a dict of row shapes for SDXL's
    conditioning (``conditioning.cond_shapes``); latent_shape: (h, w, c)."""
    return NegativesBuffer(
        text=jax.tree_util.tree_map(lambda s: jnp.zeros((size, *s), jnp.float32), text_shape,
                                    is_leaf=lambda s: isinstance(s, tuple)),
        x0=jnp.zeros((size, *latent_shape), jnp.float32),
        timesteps=jnp.zeros((size, num_steps), jnp.int32),
        latents=jnp.zeros((size, num_steps, *latent_shape), jnp.float32),
        eps=jnp.zeros((size, num_steps, *latent_shape), jnp.float32),
        final=jnp.zeros((size, *latent_shape), jnp.float32),
        filled=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
    )


class DRO(Method):
    data = "experts"
    config_section = "dro"
    config_help = {
        "margin": "DRO's hinge margin m (>= 0)",
        "sampler": f"sampler that generates DRO's negatives, one of {diffusion.SAMPLERS}",
        "num_inference_steps": "sampler steps of one negative trajectory",
        "guidance_scale": "classifier-free guidance of the negatives' sampling (1 = none)",
        "buffer_size": "trajectories kept (global); >= pairs per micro-batch / steps_per_trajectory",
        "steps_per_trajectory": "k: a micro-step of B pairs samples B/k trajectories (for its first B/k prompts and "
                                "experts; the other pairs go unused) and trains k distinct recorded steps of each "
                                "trajectory it picks: generation / k, B/k prompts per micro-step (reference: 1)",
        "refresh_every": "micro-steps between θ <- φ; 0 = θ is φ (refreshed every update)",
        "expert_timestep": f"one of {EXPERT_TIMESTEPS}: 'shared' noises the expert at the negative's t_k "
                           "(reference code)",
        "negative_target": f"one of {NEGATIVE_TARGETS}: 'sample' (default: the ablation's best) = the generated "
                           "x0 noised at t_k with the expert's ε; 'trajectory' = recorded (x_k, ε_θ(x_k)) "
                           "(reference code; configs/drosd15.py) (docs/methods.md §2)",
    }

    @classmethod
    def default_config(cls):
        return ml_collections.ConfigDict(dict(
            margin=0.001, sampler="dpm++", num_inference_steps=20, guidance_scale=1.0, buffer_size=4,
            steps_per_trajectory=1, refresh_every=0, expert_timestep="shared", negative_target="sample"))

    @classmethod
    def validate_config(cls, config, micro_batch):
        d = config.dro
        if not d.margin >= 0:
            raise ConfigError("dro.margin", d.margin, "a hinge margin >= 0")
        if d.sampler not in diffusion.SAMPLERS:
            raise ConfigError("dro.sampler", d.sampler, f"one of {diffusion.SAMPLERS}")
        if not isinstance(d.num_inference_steps, int) or d.num_inference_steps < 1:
            raise ConfigError("dro.num_inference_steps", d.num_inference_steps, "a number of sampler steps >= 1")
        if not isinstance(d.steps_per_trajectory, int) or d.steps_per_trajectory < 1:
            raise ConfigError("dro.steps_per_trajectory", d.steps_per_trajectory, "a number of steps >= 1")
        if micro_batch % d.steps_per_trajectory:
            raise ConfigError("dro.steps_per_trajectory", d.steps_per_trajectory,
                              f"must divide the micro-batch of {micro_batch} pairs")
        if d.buffer_size < micro_batch // d.steps_per_trajectory:
            raise ConfigError("dro.buffer_size", d.buffer_size, "must hold at least one micro-batch of "
                              f"trajectories ({micro_batch // d.steps_per_trajectory})")
        if d.steps_per_trajectory > d.num_inference_steps:
            raise ConfigError("dro.steps_per_trajectory", d.steps_per_trajectory, "at most dro.num_inference_steps")
        if d.expert_timestep not in EXPERT_TIMESTEPS:
            raise ConfigError("dro.expert_timestep", d.expert_timestep, f"one of {EXPERT_TIMESTEPS}")
        if d.negative_target not in NEGATIVE_TARGETS:
            raise ConfigError("dro.negative_target", d.negative_target, f"one of {NEGATIVE_TARGETS}")
        if d.refresh_every < 0:
            raise ConfigError("dro.refresh_every", d.refresh_every, "0 (θ = φ) or a positive number of micro-steps")

    @classmethod
    def describe_metrics(cls):
        return ("active_hinge",)

    @classmethod
    def fit_config_to_batch(cls, config, micro_batch):
        """The negatives buffer holds at least one micro-batch of trajectories."""
        config.dro.buffer_size = max(config.dro.buffer_size, micro_batch // config.dro.steps_per_trajectory)

    @classmethod
    def flops(cls, config, pairs, fwd, fwdbwd):
        """The update as DPO's on B experts + B negatives, plus the negatives' generation: K sampler forwards
        per trajectory, one trajectory per ``dro.steps_per_trajectory`` pairs, twice with CFG."""
        d = config.dro
        update = super().flops(config, pairs, fwd, fwdbwd)["step"]
        generation = d.num_inference_steps * (pairs / d.steps_per_trajectory) * fwd * (
            2 if d.guidance_scale != 1.0 else 1)
        return {"update": update, "generation": generation, "step": update + generation}
    state_sharding_rules = ((r"negatives/.*", "rows"),)  # trajectories split over devices like a batch

    def init_state(self, params, *, text_shape, latent_shape) -> DROState:
        cfg = self.config.dro
        buffer = empty_negatives_buffer(cfg.buffer_size, text_shape, latent_shape, cfg.num_inference_steps)
        return DROState(negatives=buffer, sampler=params if cfg.refresh_every > 0 else None)

    def begin_micro_step(self, state: DROState, params, micro_count, log_step=False) -> DROState:
        """θ <- φ every ``refresh_every`` micro-steps (a stale sampling copy in between; with LoRA a copy of
        the adapters, run on the shared base)."""
        every = self.config.dro.refresh_every
        if every <= 0:
            return state
        return state.replace(sampler=select(micro_count % every == 0, params, state.sampler))

    def loss(self, params, frozen, micro, rng, state: DROState):
        cfg = self.config.dro
        sampler = params if state.sampler is None else lora.with_trainable(params, state.sampler)
        k_gen, k_pick = jax.random.split(rng)
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)
        buffer = self.refill_negatives(state.negatives, sampler, frozen, text, x0, micro["keys"], k_gen)
        neg = self.pick_negatives(buffer, k_pick, micro["keys"])
        t_n = neg.timesteps
        t_e = t_n if cfg.expert_timestep == "shared" else self.timesteps(neg.keys)
        noise = draw(neg.keys, NOISE, lambda k: jax.random.normal(k, neg.x0.shape[1:], jnp.float32))
        x_e = self.schedule.q_sample(neg.x0, t_e, noise)
        x_n, target_n = self.negative_inputs(neg, noise)
        b = x_e.shape[0]
        err, ref_err = self.errors(params, frozen["ref"], stack(x_e, x_n), stack(t_e, t_n),
                                   stack(neg.text, neg.text), stack(noise, target_n))
        loss, metrics = objectives.dro_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], cfg.margin)
        metrics["buffer_filled"] = buffer.filled.astype(jnp.float32)
        return loss, (metrics, state.replace(negatives=buffer))

    def negative_inputs(self, neg: PickedNegatives, noise):
        """The negative term's (x [B, h, w, c], target), evaluated at t_k = ``neg.timesteps``.

        "trajectory": the recorded (x_k, ε_θ(x_k)). "sample": the generated x0 forward-noised with the
        expert's ε̄ (``noise``), target ε̄, so expert and negative differ only in the image, as in a DPO pair.
        """
        if self.config.dro.negative_target == "sample":
            return self.schedule.q_sample(neg.final, neg.timesteps, noise), noise
        return neg.latents, neg.eps

    def refill_negatives(self, buffer: NegativesBuffer, sampler_params, frozen, text, x0, keys,
                         rng) -> NegativesBuffer:
        """Samples one trajectory per ``steps_per_trajectory`` pairs with θ and writes them to the buffer.

        DPM-Solver++ (20 steps, guidance 1.0 by default) on the perturbed grid 950+p, ..., 0+p with one
        offset p per trajectory. x_T is drawn from the first pair's key of each trajectory.
        """
        cfg = self.config.dro
        n_traj = x0.shape[0] // cfg.steps_per_trajectory
        text, x0, keys = jax.tree_util.tree_map(lambda a: a[:n_traj], text), x0[:n_traj], keys[:n_traj]
        grid = diffusion.dro_timestep_grid(rng, n_traj, cfg.num_inference_steps, self.num_train_timesteps)
        x_T = draw(keys, START, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        uncond = self.unconditional(frozen, text) if cfg.guidance_scale != 1.0 else None
        final, traj = diffusion.sample(self.eps_fn(sampler_params), x_T, self.schedule, sampler=cfg.sampler,
                                   num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   rng=rng, cond=text, uncond=uncond, timesteps=grid, return_trajectory=True)
        size = buffer.x0.shape[0]
        rows = (buffer.cursor + jnp.arange(n_traj)) % size
        put = lambda dst, src: dst.at[rows].set(jax.lax.stop_gradient(src).astype(dst.dtype))
        return buffer.replace(
            text=jax.tree_util.tree_map(put, buffer.text, text), x0=put(buffer.x0, x0),
            timesteps=put(buffer.timesteps, jnp.swapaxes(traj.timesteps, 0, 1)),
            latents=put(buffer.latents, jnp.swapaxes(traj.latents, 0, 1)),
            eps=put(buffer.eps, jnp.swapaxes(traj.eps, 0, 1)),
            final=put(buffer.final, final),
            filled=jnp.minimum(buffer.filled + n_traj, size),
            cursor=(buffer.cursor + n_traj) % size,
        )

    def pick_negatives(self, buffer: NegativesBuffer, rng, keys) -> PickedNegatives:
        """Distinct valid rows, ``steps_per_trajectory`` distinct random steps of each (the reference: 1);
        ``keys`` [B] the pairs' keys, passed through."""
        cfg = self.config.dro
        n_traj = keys.shape[0] // cfg.steps_per_trajectory
        size, num_steps = buffer.timesteps.shape
        k_rows, k_steps = jax.random.split(rng)
        # Random priorities, rows not yet filled pushed last: the top n_traj are distinct valid rows.
        priority = jax.random.uniform(k_rows, (size,)) + (jnp.arange(size) < buffer.filled)
        rows = jax.lax.top_k(priority, n_traj)[1]
        steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps)[:cfg.steps_per_trajectory])(
            jax.random.split(k_steps, n_traj))
        rows = jnp.repeat(rows, cfg.steps_per_trajectory)
        steps = steps.reshape(-1)
        return PickedNegatives(text=jax.tree_util.tree_map(lambda a: a[rows], buffer.text), x0=buffer.x0[rows],
                               timesteps=buffer.timesteps[rows, steps],
                               latents=buffer.latents[rows, steps], eps=buffer.eps[rows, steps],
                               final=buffer.final[rows], keys=keys)
