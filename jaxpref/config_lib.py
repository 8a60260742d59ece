"""The one config home: the schema every run shares, its validation (run before anything compiles),
and the loader of the experiment files in ``configs/``.

Each experiment is a file in the top-level ``configs/`` folder (installed as ``jaxpref.configs``) whose
``get_config()`` starts from ``base_config()`` and changes what its run needs; its docstring says what it
trains, its cost and the expected result. A key that is not in ``base_config()`` is a typo, and
``validate`` names it.
"""
from __future__ import annotations

import ast
import importlib
import os

import jax.numpy as jnp
import ml_collections

from jaxpref import diffusion, lora, objectives, optim, sharding
from jaxpref.methods import METHODS
from jaxpref.methods.dro import EXPERT_TIMESTEPS, NEGATIVE_TARGETS
from jaxpref.methods.smpo import INVERSION_MODELS as SMPO_INVERSION_MODELS, INVERSIONS as SMPO_INVERSIONS
from jaxpref.models import attention, unet as unet_lib
from jaxpref.models.pipeline import EMBEDDED_TINY

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATASETS = ("shapes", "pickapic_v2")


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config()``: "tiny", "dposd15", "drosd15", "smposd15", ...; "tiny:smpo"
    passes "smpo" to ``get_config`` as ``--config=configs/tiny.py:smpo`` does."""
    name, _, arg = name.partition(":")
    try:
        module = importlib.import_module(f"jaxpref.configs.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"no config {name!r} in configs/ (a file configs/{name}.py with get_config())") from e
    return module.get_config(arg) if arg else module.get_config()


def parse_overrides(items) -> dict:
    """``["dro.margin=0.01", "objective=dpo"]`` -> ``{"dro.margin": 0.01, "objective": "dpo"}``: values read as
    Python literals where they parse, else kept as strings (the ``--set`` flags of the benchmarks)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key.path=value, e.g. dro.margin=0.01")
        try:
            out[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    return out


def apply_overrides(config, overrides: dict, source: str = "--set"):
    """Sets dotted keys (``{"dro.margin": 0.01}``) on ``config`` in place and returns it; a key that is not
    already in the config is a typo and raises, naming ``source`` and the key."""
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"{source} {key}: no such config key (python -m jaxpref.train --print_config "
                                 "lists them)")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"{source} {key}: no such config key (python -m jaxpref.train --print_config lists them)")
        node[leaf] = value
    return config


def config_path(name: str) -> str:
    """The file of ``configs/<name>.py`` (for ``--config=``)."""
    module = importlib.import_module("jaxpref.configs")
    return os.path.join(os.path.dirname(module.__file__), f"{name}.py")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run understands, with its default; what each means: ``KEY_HELP`` (``--print_config``)."""
    c = ml_collections.ConfigDict()
    c.objective = "dro"
    c.seed = 0
    c.model_path = EMBEDDED_TINY
    c.reference_path = ""
    c.dtype = "bfloat16"
    c.reference_dtype = "bfloat16"
    c.vae_path = ""
    c.vae_dtype = ""
    c.remat = False
    c.remat_policy = "nothing_saveable"
    c.attention = "auto"
    c.sample_posterior = True
    c.prompt_dropout = 0.2

    c.batch_size = 256
    c.grad_accum = 1
    c.total_steps = 1000
    c.max_consecutive_skips = 20

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0,
        warmup_steps=0, schedule="constant", decay_steps=1000))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, max_decay=0.9999))
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False, rank=4, alpha=4.0, target_modules=lora.DEFAULT_TARGETS, dropout=0.0, init_from=""))

    c.dpo = ml_collections.ConfigDict(dict(beta=5000.0))
    c.smpo = ml_collections.ConfigDict(dict(
        beta=2000.0, gamma=10.0,
        reward_min=objectives.PICKSCORE_MIN, reward_max=objectives.PICKSCORE_MAX,  # over Pick-a-Pic v2
        inversion="code", inversion_steps=5, inversion_iterations=2, inversion_window=(0, 3),
        inversion_noise_regularization=False, inversion_noise_shifts="code", inversion_fraction=1.0,
        inversion_model="policy"))
    c.dro = ml_collections.ConfigDict(dict(
        margin=0.001, sampler="dpm++", num_inference_steps=20, guidance_scale=1.0, buffer_size=4,
        steps_per_trajectory=1, refresh_every=0, expert_timestep="shared", negative_target="sample"))

    c.data = ml_collections.ConfigDict(dict(
        name="shapes", data_dir="", source_dir="", split="train", resolution=32, cache_dir="", scores_dir="",
        experts_dir="", experts_k=500, worker_count=0, crop="center", time_ids="crop"))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.sharding_rules = sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, export_unet=True))
    c.log = ml_collections.ConfigDict(dict(every=10, sample_every=0, sample_prompts=4))
    c.eval = ml_collections.ConfigDict(dict(
        every=0, prompts="shapes", rewards="shapes", num_prompts=32, images_per_prompt=1, sampler="ddim",
        num_steps=25, guidance_scale=3.0, batch_size=32, final=True))
    return c


def sdxl_base_config(objective: str) -> ml_collections.ConfigDict:
    """What the SDXL experiment files (configs/*sdxl.py) share, as all three releases train SDXL: the local
    SDXL base folder and fp16-fix VAE (fp32), bf16 with remat, params and optimizer sharded over every chip
    (fsdp: 2.57 B fp32 params are 9.6 GiB per chip replicated), prompt dropout 0.2, Pick-a-Pic v2 at 1024 px
    center-cropped, 64 evaluation prompts at batch 8."""
    c = base_config()
    c.objective = objective
    c.model_path = "/path/to/stable-diffusion-xl-base-1.0"
    c.vae_path = "/path/to/sdxl-vae-fp16-fix"
    c.vae_dtype = "float32"
    c.dtype = "bfloat16"
    c.remat = True
    c.mesh.update(data=1, fsdp=-1)
    c.prompt_dropout = 0.2
    c.data.update(name="pickapic_v2", resolution=1024, crop="center")
    c.eval.update(num_prompts=64, num_steps=50, batch_size=8)
    return c


# One line per key of base_config(): what it does (printed by ``python -m jaxpref.train --print_config``).
KEY_HELP = {
    "objective": f"the method trained: one of {tuple(METHODS)}",
    "seed": "the run's rng seed (noise, timesteps, prompt dropout, DRO's sampling)",
    "model_path": "a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL: also "
                  "text_encoder_2/, tokenizer_2/), or "
                  "'embedded:tiny' for the shipped tiny model of the shapes world",
    "reference_path": "the frozen reference UNet (a pipeline or UNet folder); '' = model_path's starting weights",
    "dtype": f"compute dtype {tuple(DTYPES)}; params stay fp32",
    "reference_dtype": "storage dtype of the frozen reference params",
    "vae_path": "a diffusers VAE folder used instead of model_path's vae/ (e.g. SDXL's fp16-fix VAE); '' = model_path's",
    "vae_dtype": f"the VAE's compute dtype {tuple(DTYPES)}; '' = config.dtype (SDXL's original VAE overflows in half "
                 "precision: use 'float32' or the fp16-fix VAE)",
    "remat": "gradient checkpointing per UNet block (less memory, more compute)",
    "remat_policy": f"with remat, what each block keeps for the backward pass {unet_lib.REMAT_POLICIES}: nothing "
                    "(least memory), the weight matmuls' outputs, or every matmul's",
    "attention": f"the UNet's attention backend, one of {attention.BACKENDS}: 'auto' = cuDNN flash on GPU where it "
                 "applies, else 'chunked' (O(block x tokens) memory) for long sequences and 'xla' (dense) for short",
    "sample_posterior": "x0 = a sample of the VAE posterior (False: its mean)",
    "prompt_dropout": "probability that a pair's caption becomes '' (negatives too)",
    "batch_size": "pairs per optimizer update, all devices and micro-batches together",
    "grad_accum": "micro-batches per update (a lax.scan inside the step)",
    "total_steps": "optimizer updates of the whole run (a resumed run continues to it)",
    "max_consecutive_skips": "stop the run (non-zero exit, no export) after this many updates in a row were "
                             "skipped for a non-finite loss or gradient: it has diverged; 0 = never stop",
    "optimizer.name": f"one of {optim.OPTIMIZERS}",
    "optimizer.lr": "peak learning rate",
    "optimizer.b1": "Adam's first-moment decay",
    "optimizer.b2": "Adam's second-moment decay",
    "optimizer.eps": "Adam's epsilon",
    "optimizer.weight_decay": "decoupled weight decay (adamw, adafactor)",
    "optimizer.grad_clip": "clip the gradient's global norm to this before the optimizer; <= 0: no clip",
    "optimizer.warmup_steps": "linear warmup from 0 over this many updates",
    "optimizer.schedule": f"after warmup, one of {optim.SCHEDULES} (decay to 0)",
    "optimizer.decay_steps": "updates (warmup included) over which cosine/linear decay to 0",
    "ema.enabled": "keep an EMA of the policy (checkpoints and the export then report the EMA)",
    "ema.max_decay": "cap of DRO's EMA decay min((1 + s) / (10 + s), max_decay)",
    "lora.enabled": "train LoRA adapters on the frozen UNet instead of the whole UNet; the base (stored once, in "
                    "reference_dtype) is also the reference; checkpoints and the optimizer hold adapters only",
    "lora.rank": "r, the adapters' rank",
    "lora.alpha": "α: the adapters add (α / r) · B A to each target kernel",
    "lora.target_modules": "diffusers module names adapted (a module matches if its name ends with one), from "
                           f"{lora.SUPPORTED_TARGETS}; default: every attention's to_q/to_k/to_v/to_out.0",
    "lora.dropout": "dropout on a target layer's input to its LoRA branch (PEFT's lora_dropout), training only",
    "lora.init_from": "start from a diffusers/PEFT LoRA file (pytorch_lora_weights.safetensors or its folder) "
                      "instead of fresh adapters (A random, B = 0); '' = fresh",
    "dpo.beta": "DPO's β (KL weight; the loss uses β/2)",
    "smpo.beta": "SmPO's β",
    "smpo.gamma": "SmPO's γ scaling the smoothed preference 2p - 1",
    "smpo.reward_min": "reward score mapped to preference 0 (PickScore's minimum over Pick-a-Pic v2)",
    "smpo.reward_max": "reward score mapped to preference 1 (PickScore's maximum over Pick-a-Pic v2)",
    "smpo.inversion": f"one of {SMPO_INVERSIONS}: 'code' as JaydenLyh/SmPO runs it; 'paper' lands exactly on t; "
                      "'consistent' keeps latent, timestep and target at one level; 'none' uses DPO's forward "
                      "noise (the inversion ablation); docs/methods.md §3",
    "smpo.inversion_steps": "inversion grid steps (the per-sample grid's steps in 'consistent')",
    "smpo.inversion_iterations": "'consistent': ReNoise iterations K per step (0 = plain DDIM inversion)",
    "smpo.inversion_window": "'consistent': average ε of iterations a <= i < b for the final update",
    "smpo.inversion_noise_regularization": "'consistent': ReNoise's noise regularisation of ε",
    "smpo.inversion_noise_shifts": "the regularisation's autocorrelation rolls: 'code' = shifts 0..H/2-1 as the "
                                   "released code (shift 0 pulls the variance to 0: strong on small latents), "
                                   "'paper' = 1..H/2 as the regulariser's formula (correlations only)",
    "smpo.inversion_model": f"the UNet that inverts, one of {SMPO_INVERSION_MODELS}: 'policy' (the references: "
                            "the latents follow the current policy) or 'reference' (the frozen reference: fixed "
                            "targets per image that the policy can move away from)",
    "smpo.inversion_fraction": "share of the pairs (drawn per pair) trained on inverted latents; the others on "
                               "forward noise at the same t as 'none' (1 = all inverted, the references' form)",
    "dro.margin": "DRO's hinge margin",
    "dro.sampler": "sampler that generates DRO's negatives",
    "dro.num_inference_steps": "sampler steps of one negative trajectory",
    "dro.guidance_scale": "classifier-free guidance of the negatives' sampling (1 = none)",
    "dro.buffer_size": "trajectories kept (global); >= pairs per micro-batch / steps_per_trajectory",
    "dro.steps_per_trajectory": "recorded steps of one trajectory used as negatives (reference: 1)",
    "dro.refresh_every": "micro-steps between θ <- φ; 0 = θ is φ (refreshed every update)",
    "dro.expert_timestep": f"one of {EXPERT_TIMESTEPS}: 'shared' noises the expert at the negative's t_k "
                           "(reference code)",
    "dro.negative_target": f"one of {NEGATIVE_TARGETS}: 'sample' (default: the ablation's best) = the generated x0 "
                           "noised at t_k with the expert's ε; 'trajectory' = recorded (x_k, ε_θ(x_k)) (reference "
                           "code; configs/drosd15.py) (docs/methods.md §2)",
    "data.name": f"one of {DATASETS}",
    "data.data_dir": "where the built datasets live ('' = ~/.cache/jaxpref/data)",
    "data.source_dir": "pickapic_v2: the folder of downloaded parquet shards",
    "data.split": "dataset split trained on",
    "data.resolution": "image side in pixels (latents are this / the VAE's downsampling)",
    "data.cache_dir": "a latent cache folder (python -m jaxpref.data.cache): the step runs no VAE",
    "data.scores_dir": "SmPO on pickapic_v2: reward scores folder (python -m jaxpref.data.scores)",
    "data.experts_dir": "DRO on pickapic_v2: expert set folder (python -m jaxpref.data.experts)",
    "data.experts_k": "DRO on shapes: size of the expert set built on first use",
    "data.worker_count": "grain worker processes (0: decode in this process's read threads)",
    "data.crop": "how a resized training image is cut to resolution x resolution: 'center' or 'random' (a latent "
                 "cache is center-cropped when built)",
    "data.time_ids": "SDXL's size conditioning in training: 'crop' = each image's original size and crop top-left "
                     "as recorded by the loader or cache (diffusers' SDXL script, DRO); 'fixed' = (res, res, 0, 0, "
                     "res, res) for every image (the Diffusion-DPO and SmPO SDXL scripts)",
    "mesh.data": "devices on the data axis (-1: fill)",
    "mesh.fsdp": "devices on the fsdp axis (params sharded over it; -1: fill)",
    "sharding_rules": "(regex over a leaf's path, rule), first match wins (jaxpref.sharding): state and frozen "
                      "params",
    "checkpoint.every": "updates between checkpoints (0: only the last; SIGTERM also saves)",
    "checkpoint.keep": "checkpoints kept (oldest deleted first)",
    "checkpoint.export_unet": "write the trained UNet (diffusers format) to <workdir>/export/unet at the end",
    "log.every": "updates between metric rows (metrics.jsonl, TensorBoard, the console)",
    "log.sample_every": "updates between sample grids in <workdir>/samples (0: none)",
    "log.sample_prompts": "held-out prompts in a sample grid",
    "eval.every": "updates between evaluations (0: only the final base-vs-trained one)",
    "eval.prompts": "a prompt-set spec (jaxpref.prompts.load_prompts): shapes, parti:/x.tsv, hpdv2:/dir, ...",
    "eval.rewards": "reward specs (jaxpref.rewards.load_scorers): shapes, pickscore=/dir, hpsv2=/file, ...",
    "eval.num_prompts": "prompts per evaluation",
    "eval.images_per_prompt": "images generated per prompt",
    "eval.sampler": "sampler of the evaluation images",
    "eval.num_steps": "sampler steps of an evaluation image",
    "eval.guidance_scale": "classifier-free guidance of the evaluation images",
    "eval.batch_size": "images generated at once",
    "eval.final": "evaluate base vs trained at the end (report, before/after grid, reward curve)",
}


def describe(config) -> str:
    """Every key of ``config`` with its value (and base_config()'s default where it differs) and its one-line
    meaning (``python -m jaxpref.train --print_config``)."""
    base, lines = base_config(), []
    for key in _flat_keys(config):
        value, default = _lookup(config, key), _lookup(base, key)
        changed = "" if value == default else f"   (base default: {default!r})"
        lines.append(f"{key} = {value!r}{changed}\n    {KEY_HELP.get(key, '(not a key of base_config(): a typo?)')}")
    return "\n".join(lines)


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


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
    if config.data.crop not in ("center", "random"):
        _fail("data.crop", config.data.crop, "supported ('center', 'random')")
    if config.data.time_ids not in ("crop", "fixed"):
        _fail("data.time_ids", config.data.time_ids, "supported ('crop', 'fixed')")
    if config.vae_dtype and config.vae_dtype not in DTYPES:
        _fail("vae_dtype", config.vae_dtype, f"supported {tuple(DTYPES)} or '' (= config.dtype)")
    if config.remat_policy not in unet_lib.REMAT_POLICIES:
        _fail("remat_policy", config.remat_policy, f"supported {unet_lib.REMAT_POLICIES}")
    _check_attention(config)
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
    if not isinstance(config.max_consecutive_skips, int) or config.max_consecutive_skips < 0:
        _fail("max_consecutive_skips", config.max_consecutive_skips, "a number of updates >= 0 (0: never stop)")
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
    if config.lora.enabled:
        _check_lora(config)
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


def _check_attention(config):
    try:
        attention.check_backend(config.attention)
    except ValueError as e:
        _fail("attention", config.attention, str(e))
    if config.attention == "cudnn" and config.dtype != "bfloat16":
        _fail("attention", "cudnn", f"cuDNN flash attention runs in bf16; set config.dtype='bfloat16' (is "
                                    f"{config.dtype!r}) or use 'auto'")


def _check_lora(config):
    c = config.lora
    if not isinstance(c.rank, int) or c.rank < 1:
        _fail("lora.rank", c.rank, "a rank >= 1")
    if c.alpha <= 0:
        _fail("lora.alpha", c.alpha, "a positive scale numerator (α; the update is α / r · B A)")
    if not 0.0 <= c.dropout < 1.0:
        _fail("lora.dropout", c.dropout, "a probability in [0, 1)")
    unknown = [t for t in c.target_modules if t not in lora.SUPPORTED_TARGETS]
    if not c.target_modules or unknown:
        _fail("lora.target_modules", tuple(c.target_modules), f"choose from {lora.SUPPORTED_TARGETS}")
    if config.reference_path:
        _fail("reference_path", config.reference_path,
              "with config.lora.enabled the frozen base UNet is the reference; leave reference_path empty")


def _check_smpo_inversion(s):
    if s.inversion_steps < 1:
        _fail("smpo.inversion_steps", s.inversion_steps, "a number of grid steps >= 1")
    if s.inversion_model not in SMPO_INVERSION_MODELS:
        _fail("smpo.inversion_model", s.inversion_model, f"one of {SMPO_INVERSION_MODELS}")
    if not 0.0 < s.inversion_fraction <= 1.0:
        _fail("smpo.inversion_fraction", s.inversion_fraction, "a share of the pairs in (0, 1] (no inversion: "
              "smpo.inversion='none')")
    if s.inversion != "consistent":
        if s.inversion_noise_regularization:
            _fail("smpo.inversion_noise_regularization", True, "applies to smpo.inversion='consistent' only")
        return
    k = s.inversion_iterations
    if not isinstance(k, int) or k < 0:
        _fail("smpo.inversion_iterations", k, "a number of ReNoise iterations >= 0 (0: plain DDIM inversion)")
    if s.inversion_noise_shifts not in diffusion.NOISE_SHIFTS:
        _fail("smpo.inversion_noise_shifts", s.inversion_noise_shifts, f"one of {tuple(diffusion.NOISE_SHIFTS)}")
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
    if config.vae_path and not os.path.isfile(os.path.join(config.vae_path, "config.json")):
        _fail("vae_path", config.vae_path, "not a diffusers VAE folder (config.json missing); leave empty to use "
                                           "model_path's vae/")
    if config.lora.enabled and config.lora.init_from and not os.path.exists(config.lora.init_from):
        _fail("lora.init_from", config.lora.init_from, "no such file or folder (a diffusers LoRA: "
                                                      "pytorch_lora_weights.safetensors or the folder holding it)")
    for key in ("cache_dir", "scores_dir", "experts_dir"):
        if config.data[key] and not os.path.isdir(os.path.expanduser(config.data[key])):
            _fail(f"data.{key}", config.data[key], "not a folder")


def _flat_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"
