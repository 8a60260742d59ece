"""The one config home: the schema every run shares, its validation (run before anything compiles),
and the loader of the experiment files in ``configs/``.

Each experiment is a file in the top-level ``configs/`` folder (installed as ``jaxpref.configs``) whose
``get_config()`` starts from ``base_config()`` and changes what its run needs; its docstring says what it
trains, its cost and the expected result. A key that is not in ``base_config()`` is a typo, and
``validate`` names it.
"""
from __future__ import annotations

import importlib
import os

import jax.numpy as jnp
import ml_collections

from jaxpref import objectives, optim, sharding
from jaxpref.methods import METHODS
from jaxpref.methods.dro import EXPERT_TIMESTEPS, NEGATIVE_TARGETS
from jaxpref.methods.smpo import INVERSIONS as SMPO_INVERSIONS
from jaxpref.models.pipeline import EMBEDDED_TINY

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATASETS = ("shapes", "pickapic_v2")


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config()``: "tiny", "dposd15", "drosd15", "smposd15", ..."""
    try:
        module = importlib.import_module(f"jaxpref.configs.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"no config {name!r} in configs/ (a file configs/{name}.py with get_config())") from e
    return module.get_config()


def config_path(name: str) -> str:
    """The file of ``configs/<name>.py`` (for ``--config=``)."""
    module = importlib.import_module("jaxpref.configs")
    return os.path.join(os.path.dirname(module.__file__), f"{name}.py")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "dro"
    c.seed = 0
    # A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), or
    # "embedded:tiny" for the shipped tiny model of the shapes world.
    c.model_path = EMBEDDED_TINY
    c.reference_path = ""            # frozen reference; "" = same weights as model_path
    c.dtype = "bfloat16"             # compute dtype; params stay fp32
    c.reference_dtype = "bfloat16"   # storage dtype of the frozen reference params
    c.remat = False                  # gradient checkpointing per UNet block
    c.sample_posterior = True        # x0 = sample of the VAE posterior (False: its mean)
    c.prompt_dropout = 0.2           # a pair's caption becomes "" (negatives too)

    c.batch_size = 256               # pairs per optimizer update, all devices, all micro-batches
    c.grad_accum = 1                 # micro-batches per update (a lax.scan inside the step)
    c.total_steps = 1000             # optimizer updates

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0,
        warmup_steps=0, schedule="constant", decay_steps=1000))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, max_decay=0.9999))

    c.dpo = ml_collections.ConfigDict(dict(beta=5000.0))
    c.smpo = ml_collections.ConfigDict(dict(
        beta=2000.0, gamma=10.0,
        reward_min=objectives.PICKSCORE_MIN, reward_max=objectives.PICKSCORE_MAX,  # over Pick-a-Pic v2
        inversion="code",            # "code": as JaydenLyh/SmPO runs it; "paper": lands exactly on t;
                                     # "consistent": latent, timestep and target at one level (docs/methods.md §3);
                                     # "none": no inversion, DPO's forward noise (the inversion ablation)
        inversion_steps=5,           # grid steps (the per-sample grid's steps in "consistent")
        inversion_iterations=2,      # "consistent": ReNoise iterations K per step (0 = plain DDIM inversion)
        inversion_window=(0, 3),     # "consistent": average ε of iterations a <= i < b for the final update
        inversion_noise_regularization=False))  # "consistent": ReNoise's noise regularisation of ε
    c.dro = ml_collections.ConfigDict(dict(
        margin=0.001, sampler="dpm++", num_inference_steps=20, guidance_scale=1.0,
        buffer_size=4,               # trajectories kept (global); >= pairs per micro-batch / steps_per_trajectory
        steps_per_trajectory=1,      # recorded steps of one trajectory used as negatives (reference: 1)
        refresh_every=0,             # micro-steps between θ <- φ; 0 = θ is φ (refreshed every update)
        expert_timestep="shared",    # "shared": expert noised at the negative's t_k (reference code); "independent"
        negative_target="trajectory"))  # "trajectory": recorded (x_k, ε_θ(x_k)) (reference code); "sample": the
                                        # generated x0 noised at t_k with the expert's ε, target ε (docs/methods.md §2)

    c.data = ml_collections.ConfigDict(dict(
        name="shapes",               # "shapes" (embedded) or "pickapic_v2"
        data_dir="",                 # where the built datasets live ("" = ~/.cache/jaxpref/data)
        source_dir="",               # pickapic_v2: the folder of downloaded parquet shards
        split="train",
        resolution=32,
        cache_dir="",                # a latent cache folder (python -m jaxpref.data.cache): the step runs no VAE
        scores_dir="",               # SmPO on pickapic_v2: reward scores folder (python -m jaxpref.data.scores)
        experts_dir="",              # DRO on pickapic_v2: expert set folder (python -m jaxpref.data.experts)
        experts_k=500,               # DRO on shapes: size of the expert set built on first use
        worker_count=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    # (regex over a leaf's path, rule), first match wins (jaxpref.sharding): state and frozen params.
    c.sharding_rules = sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, export_unet=True))
    c.log = ml_collections.ConfigDict(dict(every=10, sample_every=0, sample_prompts=4))
    c.eval = ml_collections.ConfigDict(dict(
        every=0,                     # updates between evaluations (0: only the final base-vs-trained one)
        prompts="shapes",            # a prompt-set spec (jaxpref.prompts.load_prompts): parti:/x.tsv, hpdv2:/dir, ...
        rewards="shapes",            # reward specs (jaxpref.rewards.load_scorers): pickscore=/dir,hpsv2=/file, ...
        num_prompts=32, images_per_prompt=1, sampler="ddim", num_steps=25, guidance_scale=3.0, batch_size=32,
        final=True))
    return c


def _fail(key, value, why):
    raise ValueError(f"config.{key}={value!r}: {why}")


def validate(config, num_devices: int | None = None, check_paths: bool = True):
    """Checks a config before anything compiles; raises ValueError naming the key and the fix."""
    ref = base_config()
    unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(ref)))
    if unknown:
        raise ValueError(f"config keys not understood: {unknown}; known keys are those of "
                         "jaxpref.config_lib.base_config() (check the spelling)")
    if config.objective not in METHODS:
        _fail("objective", config.objective, f"supported {tuple(METHODS)}")
    for key in ("dtype", "reference_dtype"):
        if config[key] not in DTYPES:
            _fail(key, config[key], f"supported {tuple(DTYPES)}")
    if config.optimizer.name not in optim.OPTIMIZERS:
        _fail("optimizer.name", config.optimizer.name, f"supported {optim.OPTIMIZERS}")
    if config.optimizer.schedule not in optim.SCHEDULES:
        _fail("optimizer.schedule", config.optimizer.schedule, f"supported {optim.SCHEDULES}")
    if config.grad_accum < 1 or config.batch_size % config.grad_accum:
        _fail("batch_size", config.batch_size, f"must be a multiple of config.grad_accum={config.grad_accum}")
    micro = config.batch_size // config.grad_accum
    if num_devices is not None and micro % num_devices:
        _fail("batch_size", config.batch_size,
              f"a micro-batch of {micro} pairs does not divide over {num_devices} devices; "
              f"make batch_size / grad_accum a multiple of {num_devices}")
    if not 0.0 <= config.prompt_dropout < 1.0:
        _fail("prompt_dropout", config.prompt_dropout, "a probability in [0, 1)")
    if config.objective == "dro":
        d = config.dro
        if micro % d.steps_per_trajectory:
            _fail("dro.steps_per_trajectory", d.steps_per_trajectory,
                  f"must divide the micro-batch of {micro} pairs")
        if d.buffer_size < micro // d.steps_per_trajectory:
            _fail("dro.buffer_size", d.buffer_size,
                  f"must hold at least one micro-batch of trajectories ({micro // d.steps_per_trajectory})")
        if d.steps_per_trajectory > d.num_inference_steps:
            _fail("dro.steps_per_trajectory", d.steps_per_trajectory, "at most dro.num_inference_steps")
        if d.expert_timestep not in EXPERT_TIMESTEPS:
            _fail("dro.expert_timestep", d.expert_timestep, f"supported {EXPERT_TIMESTEPS}")
        if d.negative_target not in NEGATIVE_TARGETS:
            _fail("dro.negative_target", d.negative_target, f"supported {NEGATIVE_TARGETS}")
        if d.refresh_every < 0:
            _fail("dro.refresh_every", d.refresh_every, "0 (θ = φ) or a positive number of micro-steps")
    if config.objective == "smpo":
        if config.smpo.inversion not in SMPO_INVERSIONS:
            _fail("smpo.inversion", config.smpo.inversion, f"supported {SMPO_INVERSIONS}")
        if config.smpo.reward_max <= config.smpo.reward_min:
            _fail("smpo.reward_max", config.smpo.reward_max, "must exceed smpo.reward_min")
        _check_smpo_inversion(config.smpo)
    if config.data.name not in DATASETS:
        _fail("data.name", config.data.name, f"supported {DATASETS}")
    for pattern, rule in config.sharding_rules:
        try:
            sharding.parse_rule(rule)
        except ValueError as e:
            _fail("sharding_rules", (pattern, rule), str(e))
    if check_paths:
        _check_paths(config)
    if config.mesh.data == 0 or config.mesh.fsdp == 0 or (config.mesh.data < 0 and config.mesh.fsdp < 0):
        _fail("mesh", dict(config.mesh), "each axis a positive size or -1 (fill), at most one -1")
    return config


def _check_smpo_inversion(s):
    if s.inversion_steps < 1:
        _fail("smpo.inversion_steps", s.inversion_steps, "a number of grid steps >= 1")
    if s.inversion != "consistent":
        if s.inversion_noise_regularization:
            _fail("smpo.inversion_noise_regularization", True, "applies to smpo.inversion='consistent' only")
        return
    k = s.inversion_iterations
    if not isinstance(k, int) or k < 0:
        _fail("smpo.inversion_iterations", k, "a number of ReNoise iterations >= 0 (0: plain DDIM inversion)")
    window = tuple(s.inversion_window)
    if len(window) != 2 or not all(isinstance(v, int) for v in window) or not 0 <= window[0] < window[1]:
        _fail("smpo.inversion_window", s.inversion_window, "(a, b) with 0 <= a < b: iterations a <= i < b averaged")
    if k > 0 and window[1] > k + 1:
        _fail("smpo.inversion_window", s.inversion_window,
              f"must lie within iterations 0..{k} of smpo.inversion_iterations={k}, e.g. (0, {k + 1})")


def _check_paths(config):
    if config.model_path != EMBEDDED_TINY and not os.path.isdir(config.model_path):
        _fail("model_path", config.model_path,
              "not a folder; point it at a local diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, "
              "tokenizer/, scheduler/) or use 'embedded:tiny'")
    if config.reference_path and not os.path.isdir(config.reference_path):
        _fail("reference_path", config.reference_path, "not a folder (leave empty to use model_path)")
    for key in ("cache_dir", "scores_dir", "experts_dir"):
        if config.data[key] and not os.path.isdir(os.path.expanduser(config.data[key])):
            _fail(f"data.{key}", config.data[key], "not a folder")


def _flat_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"
