"""The one config home: the schema every run shares, its validation (run before anything compiles),
and the loader of the experiment files in ``configs/``.

Each experiment is a file in the top-level ``configs/`` folder (installed as ``jaxpref.configs``) whose
``get_config()`` starts from ``base_config()`` and changes what its run needs; its docstring says what it
trains, its cost and the expected result. A key that is not in ``base_config()`` is a typo, and
``validate`` names it.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import os

import jax.numpy as jnp
import ml_collections

from jaxpref import hub, lora, optim, sharding
from jaxpref.errors import ConfigError
from jaxpref.methods import METHODS
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
    """The file of ``configs/<name>.py`` (for ``--config=``): installed as ``jaxpref.configs``, or the checkout's
    top-level ``configs/`` when the package runs from a source tree that was not installed."""
    try:
        folder = os.path.dirname(importlib.import_module("jaxpref.configs").__file__)
    except ModuleNotFoundError:
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return os.path.join(folder, f"{name}.py")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run understands, with its default; what each means: ``KEY_HELP`` (``--print_config``)."""
    c = ml_collections.ConfigDict()
    c.objective = next(iter(METHODS))   # the first registered method (Diffusion-DPO); every config names its own
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
    c.peak_tflops = 0.0
    c.profile = ""

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0,
        warmup_steps=0, schedule="constant", decay_steps=1000))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, max_decay=0.9999))
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False, rank=4, alpha=4.0, target_modules=lora.DEFAULT_TARGETS, dropout=0.0, init_from="",
        fuse_reference_forward=False))

    for method in METHODS.values():        # each method's own section (its module holds defaults and help)
        if method.config_section:
            c[method.config_section] = method.default_config()

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


# What a real model's run evaluates on (the SD1.5 and SDXL experiment files): the held-out Pick-a-Pic v2 captions
# built beside its training split (``data:test_unique``: test_unique of data.name in data.data_dir), scored by
# PickScore (fetched from the hub on first use). The papers' full protocols are ``python -m jaxpref.evaluate
# --protocol=...`` (docs/evaluation.md).
REAL_EVAL = dict(prompts="data:test_unique", rewards="pickscore=yuvalkirstain/PickScore_v1")


def evaluates(config, *, samples: bool = False) -> bool:
    """Whether a run generates held-out images: an evaluation (eval.final, or eval.every before the last
    update) or, with ``samples``, a sample grid (log.sample_every) too."""
    def within(every):
        return 0 < every < config.total_steps
    return bool(config.eval.final or within(config.eval.every) or (samples and config.log.sample_every))


def sd15_base_config(objective: str) -> ml_collections.ConfigDict:
    """What the SD1.5 experiment files (configs/*sd15.py) share: SD1.5 by hub id, bf16, sized for a TPU v5e-8
    (16 GiB per chip; docs/performance.md, python -m jaxpref.aot): params, AdamW state and reference split
    over every device (fsdp), each UNet block rematerialised, attention 'auto' (Pallas flash attention on
    TPU, cuDNN on GPU); Pick-a-Pic v2 at 512 px center-cropped; evaluated on 64 of its held-out captions
    (``REAL_EVAL``), 50 steps, CFG 7.5."""
    c = base_config()
    c.objective = objective
    c.model_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # a hub id, or a local diffusers folder
    c.dtype = "bfloat16"
    c.remat = True
    c.mesh.update(data=1, fsdp=-1)
    c.data.update(name="pickapic_v2", resolution=512, crop="center")
    c.eval.update(num_prompts=64, sampler="ddim", num_steps=50, guidance_scale=7.5, **REAL_EVAL)
    return c


def sdxl_base_config(objective: str) -> ml_collections.ConfigDict:
    """What the SDXL experiment files (configs/*sdxl.py) share, as all three releases train SDXL: the local
    SDXL base folder and fp16-fix VAE (fp32), bf16 with remat, params and optimizer sharded over every chip
    (fsdp: 2.57 B fp32 params are 9.6 GiB per chip replicated), prompt dropout 0.2, Pick-a-Pic v2 at 1024 px
    center-cropped, evaluated on 64 of its held-out captions (``REAL_EVAL``) at batch 8."""
    c = base_config()
    c.objective = objective
    c.model_path = "stabilityai/stable-diffusion-xl-base-1.0"
    c.vae_path = "madebyollin/sdxl-vae-fp16-fix"
    c.vae_dtype = "float32"
    c.dtype = "bfloat16"
    c.remat = True
    c.mesh.update(data=1, fsdp=-1)
    c.prompt_dropout = 0.2
    c.data.update(name="pickapic_v2", resolution=1024, crop="center")
    c.eval.update(num_prompts=64, num_steps=50, batch_size=8, **REAL_EVAL)
    return c


# One line per key of base_config(): what it does (printed by ``python -m jaxpref.train --print_config``).
KEY_HELP = {
    "objective": f"the method trained: one of {tuple(METHODS)}",
    "seed": "the run's rng seed (noise, timesteps, prompt dropout, DRO's sampling)",
    "model_path": "a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL: also "
                  "text_encoder_2/, tokenizer_2/), a Hugging Face hub id org/name[@revision][/subfolder] (fetched "
                  "into the HF cache once, before the data: HF_HOME, HF_TOKEN, HF_HUB_OFFLINE), or "
                  "'embedded:tiny' for the shipped tiny model of the shapes world",
    "reference_path": "the frozen reference UNet (a pipeline or UNet folder, or a hub id); '' = model_path's starting "
                      "weights",
    "dtype": f"compute dtype {tuple(DTYPES)}; params stay fp32",
    "reference_dtype": "storage dtype of the frozen reference params",
    "vae_path": "a diffusers VAE folder or hub id used instead of model_path's vae/ (e.g. SDXL's fp16-fix VAE, "
                "madebyollin/sdxl-vae-fp16-fix); '' = model_path's",
    "vae_dtype": f"the VAE's compute dtype {tuple(DTYPES)}; '' = config.dtype (SDXL's original VAE overflows in half "
                 "precision: use 'float32' or the fp16-fix VAE)",
    "remat": "gradient checkpointing per UNet block (less memory, more compute)",
    "remat_policy": f"with remat, what each block keeps for the backward pass {tuple(unet_lib.REMAT_POLICIES)}: "
                    "nothing (least memory), the weight matmuls' outputs, those and the convolutions' outputs, or "
                    "every matmul's and convolution's (attention's logits included)",
    "attention": f"the UNet's attention backend, one of {attention.BACKENDS}: 'auto' = cuDNN flash on GPU where it "
                 "applies, else 'chunked' (O(block x tokens) memory) for long sequences and 'xla' (dense) for short; "
                 "'cudnn_padded' also runs the 77-key text cross-attention on cuDNN (keys padded to 128, masked)",
    "sample_posterior": "x0 = a sample of the VAE posterior (False: its mean)",
    "prompt_dropout": "probability that a caption becomes '': a pair's for the whole pair (negatives too); KTO's "
                      "per image",
    "batch_size": "pairs per optimizer update, all devices and micro-batches together",
    "grad_accum": "micro-batches per update (a lax.scan inside the step)",
    "total_steps": "optimizer updates of the whole run (a resumed run continues to it)",
    "max_consecutive_skips": "stop the run (non-zero exit, no export) after this many updates in a row were "
                             "skipped for a non-finite loss or gradient: it has diverged; 0 = never stop",
    "peak_tflops": "one device's peak TFLOP/s for perf/mfu; 0 = from the known devices (GPUs, TPUs; CPU: none, "
                   "so no MFU is logged)",
    "profile": "'a:b' writes a jax.profiler trace of updates a..b (1-based, inclusive) to <workdir>/profile "
               "(TensorBoard's profile tab, Perfetto); '' = none",
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
    "lora.fuse_reference_forward": "policy and reference (the base) errors from one UNet call on the stacked batch "
                                   "instead of two (same result to rounding); its backward runs through both "
                                   "halves: docs/performance.md has the measured cost",
    "lora.init_from": "start from a diffusers/PEFT LoRA file (pytorch_lora_weights.safetensors, its folder or a hub "
                      "id) instead of fresh adapters (A random, B = 0); '' = fresh",
    "data.name": f"one of {DATASETS}, or a build of one with other settings (pickapic_v2/resolution256)",
    "data.data_dir": "where the built datasets live ('' = $JAXPREF_DATA_DIR, else $XDG_CACHE_HOME/jaxpref/tfds, "
                     "i.e. ~/.cache/jaxpref/tfds when XDG_CACHE_HOME is unset)",
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
    "checkpoint.export_unet": "write the trained model at the end as a diffusers pipeline folder, <workdir>/export "
                              "(the trained unet/, the other parts as loaded): usable as a later run's model_path",
    "log.every": "updates between metric rows (metrics.jsonl, TensorBoard, the console)",
    "log.sample_every": "updates between sample grids in <workdir>/samples (0: none)",
    "log.sample_prompts": "held-out prompts in a sample grid",
    "eval.every": "updates between evaluations (0: only the final base-vs-trained one)",
    "eval.prompts": "a prompt-set spec (jaxpref.prompts.load_prompts): shapes, parti:/x.tsv, hpdv2:/dir, "
                    "data:test_unique (the run's dataset's split), tfds:NAME:SPLIT[:DIR], ...",
    "eval.rewards": "reward specs (jaxpref.rewards.load_scorers): shapes, pickscore=/dir, hpsv2=/file, ...; a path "
                    "may be a hub id (pickscore=yuvalkirstain/PickScore_v1)",
    "eval.num_prompts": "prompts per evaluation",
    "eval.images_per_prompt": "images generated per prompt",
    "eval.sampler": "sampler of the evaluation images",
    "eval.num_steps": "sampler steps of an evaluation image",
    "eval.guidance_scale": "classifier-free guidance of the evaluation images",
    "eval.batch_size": "images generated at once",
    "eval.final": "evaluate base vs trained at the end (report, before/after grid, reward curve)",
}


def key_help() -> dict[str, str]:
    """``KEY_HELP`` with every registered method's section (``Method.config_help``)."""
    out = dict(KEY_HELP)
    for method in METHODS.values():
        if method.config_section:
            out.update({f"{method.config_section}.{k}": v for k, v in method.config_help.items()})
    return out


def describe(config) -> str:
    """Every key of ``config`` with its value (and base_config()'s default where it differs) and its one-line
    meaning (``python -m jaxpref.train --print_config``)."""
    base, lines, helps = base_config(), [], key_help()
    for key in _flat_keys(config):
        value, default = _lookup(config, key), _lookup(base, key)
        changed = "" if value == default else f"   (base default: {default!r})"
        lines.append(f"{key} = {value!r}{changed}\n    {helps.get(key, '(not a key of base_config(): a typo?)')}")
    return "\n".join(lines)


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def _fail(key, value, why):
    raise ConfigError(key, value, why)


def validate(config, num_devices: int | None = None, check_paths: bool = True):
    """Checks a config before anything compiles; raises ValueError naming the key and the fix."""
    if config.get("objective") not in METHODS:
        _fail("objective", config.get("objective"), f"one of {tuple(METHODS)}{did_you_mean(config.get('objective'), METHODS)}")
    known = list(_flat_keys(base_config()))
    unknown = sorted(set(_flat_keys(config)) - set(known))
    if unknown:
        raise ConfigError(unknown[0], _lookup(config, unknown[0]),
                          f"no such config key{did_you_mean(unknown[0], known)} (python -m jaxpref.train "
                          "--print_config lists them)")
    _check_sizes(config)
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
        _fail("remat_policy", config.remat_policy, f"supported {tuple(unet_lib.REMAT_POLICIES)}")
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
    METHODS[config.objective].validate_config(config, micro)
    if config.lora.enabled:
        _check_lora(config)
    elif config.lora.fuse_reference_forward:
        _fail("lora.fuse_reference_forward", True, "applies with lora.enabled (the policy's base is the reference)")
    if config.data.name.partition("/")[0] not in DATASETS:
        _fail("data.name", config.data.name, f"one of {DATASETS}, or a build of one (pickapic_v2/<its name>)")
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
    if config.attention in ("cudnn", "cudnn_padded") and config.dtype != "bfloat16":
        _fail("attention", config.attention, f"cuDNN flash attention runs in bf16; set config.dtype='bfloat16' (is "
                                             f"{config.dtype!r}) or use 'auto'")


def _check_lora(config):
    c = config.lora
    if not isinstance(c.rank, int) or c.rank < 1:
        _fail("lora.rank", c.rank, "a rank >= 1")
    if c.alpha <= 0:
        _fail("lora.alpha", c.alpha, "a positive scale numerator (α; the update is α / r · B A)")
    if not 0.0 <= c.dropout < 1.0:
        _fail("lora.dropout", c.dropout, "a probability in [0, 1)")
    if c.fuse_reference_forward and not METHODS[config.objective].uses_reference:
        _fail("lora.fuse_reference_forward", True, f"objective {config.objective!r} has no reference forward to fuse")
    unknown = [t for t in c.target_modules if t not in lora.SUPPORTED_TARGETS]
    if not c.target_modules or unknown:
        _fail("lora.target_modules", tuple(c.target_modules), f"choose from {lora.SUPPORTED_TARGETS}")
    if config.reference_path:
        _fail("reference_path", config.reference_path,
              "with config.lora.enabled the frozen base UNet is the reference; leave reference_path empty")


def _check_paths(config):
    """Local paths must exist; a hub id is checked for its syntax only (``jaxpref.hub`` fetches it later)."""
    model = config.model_path
    if model != EMBEDDED_TINY and not os.path.isdir(model) and not hub.is_hub_id(model):
        _fail("model_path", model,
              "not a folder; point it at a local diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, "
              f"tokenizer/, scheduler/), {hub.ID_SYNTAX} or 'embedded:tiny'")
    if config.reference_path and not os.path.isdir(config.reference_path) and not hub.is_hub_id(config.reference_path):
        _fail("reference_path", config.reference_path, f"not a folder nor {hub.ID_SYNTAX} (leave empty to use "
                                                       "model_path)")
    if (config.vae_path and not os.path.isfile(os.path.join(config.vae_path, "config.json"))
            and not hub.is_hub_id(config.vae_path)):
        _fail("vae_path", config.vae_path, f"not a diffusers VAE folder (config.json missing) nor {hub.ID_SYNTAX}; "
                                           "leave empty to use model_path's vae/")
    init_from = config.lora.init_from
    if config.lora.enabled and init_from and not os.path.exists(init_from) and not hub.is_hub_id(init_from):
        _fail("lora.init_from", init_from, "no such file or folder (a diffusers LoRA: pytorch_lora_weights.safetensors "
                                           f"or the folder holding it) nor {hub.ID_SYNTAX}")
    for key in ("cache_dir", "scores_dir", "experts_dir"):
        if config.data[key] and not os.path.isdir(os.path.expanduser(config.data[key])):
            _fail(f"data.{key}", config.data[key], "not a folder")


def did_you_mean(name, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices`` to a mistyped ``name``, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive(config, key, *, integer=True, allow_zero=False, why=""):
    value = _lookup(config, key)
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        _fail(key, value, f"{kind} {'>= 0' if allow_zero else '> 0'}{why}")


def profile_range(config) -> tuple[int, int] | None:
    """(first, last) update of ``config.profile`` ('a:b'), or None."""
    if not config.profile:
        return None
    try:
        first, last = (int(v) for v in str(config.profile).split(":"))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        _fail("profile", config.profile, "'a:b' with 1 <= a <= b (updates a to b traced), or '' for none")
    return first, last


def _check_sizes(config):
    """Sizes, steps and rates that no run can use, refused before anything loads."""
    profile_range(config)
    _positive(config, "peak_tflops", integer=False, allow_zero=True)
    for key in ("batch_size", "grad_accum", "total_steps", "eval.num_prompts", "eval.images_per_prompt",
                "eval.num_steps", "eval.batch_size", "data.resolution", "log.sample_prompts"):
        _positive(config, key)
    for key in ("checkpoint.every", "log.every", "log.sample_every", "eval.every", "optimizer.warmup_steps",
                "data.worker_count"):
        _positive(config, key, allow_zero=True)
    _positive(config, "checkpoint.keep")
    _positive(config, "optimizer.lr", integer=False)
    _positive(config, "optimizer.eps", integer=False)
    _positive(config, "optimizer.weight_decay", integer=False, allow_zero=True)
    for key in ("optimizer.b1", "optimizer.b2"):
        if not 0.0 <= _lookup(config, key) < 1.0:
            _fail(key, _lookup(config, key), "a decay rate in [0, 1)")
    if config.optimizer.schedule != "constant":
        _positive(config, "optimizer.decay_steps")
    if config.optimizer.warmup_steps > config.total_steps:
        _fail("optimizer.warmup_steps", config.optimizer.warmup_steps,
              f"at most config.total_steps={config.total_steps}")
    if not 0.0 < config.ema.max_decay < 1.0:
        _fail("ema.max_decay", config.ema.max_decay, "a decay in (0, 1)")
    if config.eval.guidance_scale < 0:
        _fail("eval.guidance_scale", config.eval.guidance_scale, "a guidance scale >= 0 (1 = no guidance)")


def _flat_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"
