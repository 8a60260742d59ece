"""The DDPM noise schedule (docs/methods.md §0) built from a diffusers ``scheduler_config.json``.

``NoiseSchedule`` is a frozen, hashable dataclass registered as a *static* pytree (no leaves): it can be
closed over in ``jax.jit``, passed as a jit argument, or used as a static argument, and never causes a
retrace unless its config changes. ``alphas_cumprod`` is rebuilt bitwise as diffusers builds it
(torch float32 ``linspace``, float64-accumulated ``cumprod``), so the samplers can match the PyTorch
schedulers to float32 rounding.

Timestep conventions (diffusers'): integer timesteps t in [0, T); ᾱ_t = alphas_cumprod[t]. A negative
timestep means "past the end of the chain" and maps to a sampler-specific value (``final_alpha_cumprod``
for DDIM and DDIM inversion, 1.0 for DDPM, σ = 0 for DPM-Solver++).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "ddpm", "dpm++")

# Keys whose value we read into NoiseSchedule fields.
_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
           "steps_offset", "timestep_spacing", "set_alpha_to_one", "clip_sample", "clip_sample_range")

# Keys accepted only with the listed values: the math we implement. Other values raise ValueError.
_FIXED = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "variance_type": (None, "fixed_small"),                      # DDPMScheduler
    "algorithm_type": ("dpmsolver++",),                          # DPMSolverMultistepScheduler ...
    "solver_order": (2,),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-math.inf,),
}

# Keys with no effect on what we compute (given the _FIXED values above), accepted with any value:
#   skip_prk_steps: PNDM's Runge-Kutta warmup (SD1.5 ships a PNDMScheduler config);
#   lower_order_final / euler_at_final: with solver_order 2 and final_sigmas_type "zero" diffusers
#     takes a first-order final step either way;
#   dynamic_thresholding_ratio / sample_max_value: only read when thresholding=True;
#   flow_shift / time_shift_type: only read with flow sigmas or dynamic shifting;
#   interpolation_type / sigma_min / sigma_max / timestep_type: EulerDiscreteScheduler's sigma options (SDXL
#     ships an Euler config); none of our samplers is Euler, they read only the betas and the spacing.
_INERT = ("skip_prk_steps", "lower_order_final", "euler_at_final", "dynamic_thresholding_ratio", "sample_max_value",
          "flow_shift", "time_shift_type", "interpolation_type", "sigma_min", "sigma_max", "timestep_type")


def _unsupported(key: str, value: Any, supported) -> ValueError:
    return ValueError(f"scheduler config: {key}={value!r} is not supported; supported values: {supported}")


# ---------------------------------------------------------------------------------------------
# Betas exactly as diffusers builds them (torch float32 arithmetic reproduced in numpy).

def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit.

    torch rounds the endpoints and the step to float32, then fills the first half forward from
    ``start`` and the second half backward from ``end`` (products rounded once, to float32).
    """
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    forward = np.float64(start) + step * i
    backward = np.float64(end) - step * (steps - 1 - i)
    return np.where(i < steps // 2, forward, backward).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers ``betas_for_alpha_bar`` (cosine, Nichol & Dhariwal 2021): float64 math, float32 result."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
               trained_betas=None) -> np.ndarray:
    """β_1..β_T as float32 [T], as diffusers' DDIM/DDPM/DPM-Solver schedulers build them."""
    if trained_betas is not None:
        return np.asarray(trained_betas, np.float32)
    if beta_schedule == "linear":
        return _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":  # linspace in sqrt space (docs/methods.md §0)
        return _torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise _unsupported("beta_schedule", beta_schedule, BETA_SCHEDULES)


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 − β_s): float32 (1 − β), accumulated in float64 as torch.cumprod does, float32 out."""
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The schedule.

@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule plus the diffusers options that change sampling.

    Fields mirror diffusers scheduler config keys. ``timestep_spacing=None`` means the config did not set
    it, and each sampler uses its diffusers class default (DDIM/DDPM: "leading", DPM-Solver++: "linspace"),
    exactly as ``<Scheduler>.from_config(config)`` would.

    ``clip_sample`` clips the x0 prediction to ±``clip_sample_range`` in DDIM and DDPM steps (as diffusers);
    DPMSolverMultistepScheduler has no such option, so "dpm++" ignores it, as diffusers does.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Optional[tuple] = None
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    timestep_spacing: Optional[str] = None
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "a positive int")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise _unsupported("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise _unsupported("trained_betas", f"<{len(self.trained_betas)} values>",
                               f"a list of num_train_timesteps={self.num_train_timesteps} floats")
        if self.prediction_type not in PREDICTION_TYPES:
            raise _unsupported("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _unsupported("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise _unsupported("steps_offset", self.steps_offset, "a non-negative int")

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping[str, Any]]) -> "NoiseSchedule":
        """From a diffusers scheduler config: a dict, a ``scheduler_config.json`` path, or its folder.

        Keys starting with "_" (``_class_name``, ``_diffusers_version``) are metadata and ignored. Options
        that would change the math in ways not implemented raise ValueError naming the key and the
        supported values; unknown keys raise too rather than being silently dropped.
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            with open(path) as f:
                config = json.load(f)
        fields = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT:
                continue
            if key in _FIELDS:
                fields[key] = value
            elif key in _FIXED:
                if value not in _FIXED[key]:
                    raise _unsupported(key, value, _FIXED[key])
            else:
                raise ValueError(f"scheduler config: unknown key {key!r}; supported keys: "
                                 f"{sorted(_FIELDS + tuple(_FIXED) + _INERT)}")
        if fields.get("trained_betas") is not None:
            fields["trained_betas"] = tuple(float(b) for b in fields["trained_betas"])
        for key in ("beta_start", "beta_end", "clip_sample_range"):
            if key in fields:
                fields[key] = float(fields[key])
        for key in ("set_alpha_to_one", "clip_sample"):
            if key in fields and not isinstance(fields[key], bool):
                raise _unsupported(key, fields[key], (True, False))
        return cls(**fields)

    # -- tables (host numpy, cached; jnp views for traced code) -------------------------------------

    @functools.cached_property
    def betas_np(self) -> np.ndarray:
        """β [T] float32 (numpy)."""
        return make_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps,
                          self.trained_betas)

    @functools.cached_property
    def alphas_cumprod_np(self) -> np.ndarray:
        """ᾱ [T] float32 (numpy), bitwise equal to diffusers' ``scheduler.alphas_cumprod``."""
        return cumprod_alphas(self.betas_np)

    @property
    def alphas_cumprod(self) -> jax.Array:
        """ᾱ [T] float32 (jnp)."""
        return jnp.asarray(self.alphas_cumprod_np)

    @property
    def final_alpha_cumprod(self) -> float:
        """ᾱ used past the end of the chain by DDIM (and as DDIMInverse's ``initial_alpha_cumprod``).

        1.0 if ``set_alpha_to_one`` else ᾱ_0 (SD1.5: ᾱ_0 = 0.99915).
        """
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod_np[0])

    @functools.cached_property
    def dpm_sigmas_np(self) -> np.ndarray:
        """DPM-Solver's σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) [T] float32, computed as diffusers does (float32)."""
        ac = self.alphas_cumprod_np
        return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)

    # -- per-sample gathers ------------------------------------------------------------------------

    def alpha_cumprod_at(self, t, final: Optional[float] = None) -> jax.Array:
        """ᾱ_t gathered for integer timesteps ``t`` (any shape); t < 0 gives ``final``.

        final: value for negative t, default ``final_alpha_cumprod``. Returns float32 of t's shape.
        """
        final = self.final_alpha_cumprod if final is None else final
        t = jnp.asarray(t, jnp.int32)
        ac = self.alphas_cumprod[jnp.clip(t, 0, self.num_train_timesteps - 1)]
        return jnp.where(t >= 0, ac, jnp.float32(final))

    # -- forward process and parameterisations (docs/methods.md §0) ----------------------------------------

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε. x0, noise: [B, ...]; t: [B] int. Returns x0's dtype."""
        a = _bcast(self.alpha_cumprod_at(t), x0)
        out = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
        return out.astype(x0.dtype)

    def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x0 (diffusers ``get_velocity``). Shapes as ``q_sample``."""
        a = _bcast(self.alpha_cumprod_at(t), x0)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0

    def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the model should output at q_sample(x0, t, noise): ε, v or x0 by ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def pred_to_x0(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """x0 predicted by ``model_output`` (in ``prediction_type``) at latent x_t [B, ...], timesteps t [B]."""
        return output_to_x0_eps(model_output, x_t, _bcast(self.alpha_cumprod_at(t), x_t), self.prediction_type)[0]

    def pred_to_eps(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """ε predicted by ``model_output`` (in ``prediction_type``) at latent x_t [B, ...], timesteps t [B]."""
        return output_to_x0_eps(model_output, x_t, _bcast(self.alpha_cumprod_at(t), x_t), self.prediction_type)[1]

    def eps_to_x0(self, eps: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """x0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t."""
        return output_to_x0_eps(eps, x_t, _bcast(self.alpha_cumprod_at(t), x_t), "epsilon")[0]

    def x0_to_eps(self, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """ε = (x_t − √ᾱ_t x0)/√(1−ᾱ_t)."""
        return output_to_x0_eps(x0, x_t, _bcast(self.alpha_cumprod_at(t), x_t), "sample")[1]

    # -- timestep grids ----------------------------------------------------------------------------

    def spacing_for(self, sampler: str) -> str:
        """The timestep spacing ``sampler`` uses: the config's, else the diffusers class default."""
        _check_sampler(sampler)
        if self.timestep_spacing is not None:
            return self.timestep_spacing
        return "linspace" if sampler == "dpm++" else "leading"

    def timesteps(self, num_steps: int, sampler: str = "ddim") -> np.ndarray:
        """The descending grid [num_steps] int32 that diffusers' ``set_timesteps(num_steps)`` produces.

        sampler "ddim" / "ddpm": DDIMScheduler / DDPMScheduler (SD1.5, 50 steps: 981, 961, ..., 1).
        sampler "dpm++": DPMSolverMultistepScheduler (its own rules; SD1.5's config, which sets no
        spacing, gives linspace: 20 steps -> 999, 949, 899, ..., 49).
        """
        _check_sampler(sampler)
        check_num_steps(num_steps, self.num_train_timesteps)
        T, n, spacing = self.num_train_timesteps, num_steps, self.spacing_for(sampler)
        if sampler == "dpm++":
            # lambda_min_clipped = -inf, so diffusers' last_timestep is T.
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
            elif spacing == "leading":
                ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + self.steps_offset
            else:
                ts = np.arange(T, 0, -T / n).round() - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        return np.ascontiguousarray(ts).astype(np.int32)

    def prev_timesteps(self, num_steps: int, sampler: str = "ddim") -> np.ndarray:
        """The timestep each step of ``timesteps(num_steps, sampler)`` moves to [num_steps] int32 (< 0: end).

        DDIM uses diffusers' rule t − T // num_steps (not the next grid entry: they differ for trailing
        spacing with T % num_steps != 0); DDPM and DPM-Solver++ move to the next grid entry.
        """
        ts = self.timesteps(num_steps, sampler)
        if sampler == "ddim":
            return (ts - self.num_train_timesteps // num_steps).astype(np.int32)
        return next_timesteps(ts)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the samplers and inversion.

def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not supported; supported values: {SAMPLERS}")


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """ValueError unless 1 <= num_steps <= num_train_timesteps (diffusers' set_timesteps check)."""
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps!r} is not supported; supported values: an int in "
                         f"[1, num_train_timesteps={num_train_timesteps}]")


def next_timesteps(grid):
    """For descending grids [..., S]: each step's next entry, −1 after the last. numpy or jnp in, same out."""
    xp = np if isinstance(grid, np.ndarray) else jnp
    tail = xp.full(grid.shape[:-1] + (1,), -1, dtype=grid.dtype)
    return xp.concatenate([grid[..., 1:], tail], axis=-1)


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] to broadcast against ``like`` [B, ...]."""
    return jnp.reshape(a, a.shape + (1,) * (like.ndim - a.ndim))


def output_to_x0_eps(model_output, x_t, alpha_cumprod, prediction_type: str):
    """(x0, ε) implied by a model output at latent x_t with noise level ᾱ (broadcastable to x_t).

    epsilon: x0 = (x − √(1−ᾱ) ε)/√ᾱ; v_prediction: x0 = √ᾱ x − √(1−ᾱ) v, ε = √ᾱ v + √(1−ᾱ) x;
    sample: ε = (x − √ᾱ x0)/√(1−ᾱ). Float32 math.
    """
    out, x = model_output.astype(jnp.float32), x_t.astype(jnp.float32)
    sa, sb = jnp.sqrt(alpha_cumprod), jnp.sqrt(1.0 - alpha_cumprod)
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise _unsupported("prediction_type", prediction_type, PREDICTION_TYPES)
