"""Benchmark suite of the train step: DPO, DRO and SmPO steps with cached latents, random weights.

  python -m jaxpref.bench                                   # CPU smoke: tiny UNet, 8x8 latents, all three
  python -m jaxpref.bench --size sd15 --batch 8 --torch --torch-compile --json $OUT/bench.json   # one H100
  python -m jaxpref.bench --memory-table --json $OUT/memory.json    # CPU: per-device bytes over 1/2/4/8 devices

Rows (one table, ``--json`` writes every number): the DPO step; DRO's DPM++-20 negative generation alone,
its whole step and the update (step − generation, derived); SmPO's inversion alone and its whole step;
with ``--torch`` the PyTorch reference DPO step (``benchmarks/torch_dpo_step.py``, diffusers UNet, SDPA,
bf16) run in a subprocess on the same device. Every row is jitted (compile and 2 warm-up calls
excluded) and timed as the median of ``--iters`` calls with ``block_until_ready``. The step runs as a
training loop would: ``sharding.jit_train_step`` (explicit shardings, donated state), its new state
fed back. Weights are random: the time does not depend on their values.

FLOP model, per step of B pairs (F = one UNet forward of one image, G = forward + backward):
  DPO         2B·G + 2B·F                policy fwd+bwd and reference fwd on the 2B winner/loser latents
  DRO update  2B·G + 2B·F                the same on B experts + B negatives
  DRO gen     K·(B/spt)·F·c              DPM++ K = 20 forwards per trajectory, one trajectory per
                                         ``dro.steps_per_trajectory`` (spt) pairs; c = 2 with CFG, else 1
  DRO step    DRO update + DRO gen
  SmPO inv    2·S·2B·F                   S scan steps × 2 ReNoise predictions × the 2B images (= 2·2·S
                                         forwards per pair); S = smpo.inversion_steps ("code"), +1 ("paper").
                                         The masked scan computes a step unless every sample is past it,
                                         so this counts what runs, not the ~7.6 forwards/image that
                                         uniform t needs.
  SmPO step   DPO + SmPO inv
Not counted: the CLIP text encoder (0.013 TFLOP per caption, B per step: < 0.3%), loss and optimizer
elementwise work, and remat's recomputation (MFU counts model FLOPs, not executed ones).
F and G: sd15 uses METHODS §0's measured counts at 64×64 (F = 0.80 TFLOP, G = 2.36 TFLOP); other
sizes use XLA's cost analysis of a batch-1 UNet forward and forward+backward ("xla-unet").
MFU = model FLOPs / step seconds / the device's dense bf16 peak (``PEAK_TFLOPS``; unknown → n/a).

The second count ("xla") is ``jitted.lower(...).compile().cost_analysis()['flops']`` of each program.
XLA counts a while loop's body once (not × its trip count, checked on CPU) and a ``lax.cond`` once,
so the scans of DRO's sampler and SmPO's inversion are corrected: a standalone generation/inversion
program whose count is under half the model's is taken as one loop body, the loop count is
``trips × raw``, and the step's is ``raw + (trips − 1) × body``. XLA also counts remat's recompute,
and nothing inside custom calls (cuDNN flash attention): read it as a cross-check, not as the MFU.

Peak memory: ``jax.devices()[0].memory_stats()['peak_bytes_in_use']`` (the process high-water mark;
each objective runs in its own subprocess when several are asked for) where the backend reports it
("hwm"), else the compiled ``memory_analysis()``: argument + output + temp − alias ("xla").
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import config_lib, diffusion, sharding, step as step_lib, trainer
from jaxpref.models import clip, pipeline as pipeline_lib, unet as unet_lib, vae as vae_lib

# ---------------------------------------------------------------------------------------------
# Sizes, peaks, the FLOP model.

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                  "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True,
                  "prediction_type": "epsilon"}
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                        attention_head_dim=4, norm_num_groups=8)
# SD1.5's UNet at an eighth of the width in every block (same depth, attention layout, 768-d text).
SD15_NARROW_UNET_CONFIG = {**unet_lib.SD15_UNET_CONFIG, "block_out_channels": [64, 128, 256, 256]}


@dataclasses.dataclass(frozen=True)
class Size:
    unet: dict                     # diffusers unet/config.json
    latent: int                    # latent side (h = w)
    text: clip.TextConfig          # the caption encoder (SD1.5: CLIP ViT-L/14's text tower)
    vae_channels: tuple            # VAE block_out_channels: only their count matters (latent_shape)
    batch: int                     # default pairs per step
    fwd_flops: Optional[float]     # F per image (None: from XLA)
    fwdbwd_flops: Optional[float]  # G per image


SD15_TEXT = clip.TextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77)
TINY_TEXT = clip.TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8,
                            bos_token_id=998, eos_token_id=999, pad_token_id=999)
SD15_FWD_FLOPS = 0.80e12     # METHODS §0: SD1.5 UNet forward, one image, 64x64 latents, 77 tokens
SD15_FWDBWD_FLOPS = 2.36e12  # forward + backward
SIZES = {
    "tiny": Size(TINY_UNET_CONFIG, 8, TINY_TEXT, (8, 16), 2, None, None),
    "tiny16": Size(TINY_UNET_CONFIG, 16, TINY_TEXT, (8, 16), 2, None, None),
    "sd15": Size(unet_lib.SD15_UNET_CONFIG, 64, SD15_TEXT, (128, 256, 512, 512), 8, SD15_FWD_FLOPS, SD15_FWDBWD_FLOPS),
    "sd15-narrow": Size(SD15_NARROW_UNET_CONFIG, 64, SD15_TEXT, (128, 256, 512, 512), 8, None, None),
}

# Dense bf16 peak TFLOP/s per device, matched by substring of ``device_kind``, first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v4", 275.0),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def mfu(flops: Optional[float], seconds: float, device_kind: str) -> Optional[float]:
    """Model FLOPs utilisation: flops / seconds / peak; None when the peak or the count is unknown."""
    peak = peak_flops(device_kind)
    if peak is None or flops is None or not seconds > 0:
        return None
    return flops / seconds / peak


def inversion_scan_steps(steps: int, mode: str) -> int:
    """Steps of SmPO's inversion scan: one per grid source ("code"), one more to reach t > top ("paper"),
    none without inversion ("none": forward noise, as DPO)."""
    if mode == "none":
        return 0
    return steps + (1 if mode == "paper" else 0)


def model_flops(workload: str, pairs: int, fwd: float, fwdbwd: float, *, gen_steps: int = 20,
                steps_per_trajectory: int = 1, guidance_scale: float = 1.0, inversion_steps: int = 5,
                inversion_mode: str = "code") -> float:
    """FLOPs of one call of ``workload`` on ``pairs`` pairs by the model in the module docstring."""
    update = 2 * pairs * fwdbwd + 2 * pairs * fwd
    gen = gen_steps * (pairs // steps_per_trajectory) * fwd * (2 if guidance_scale != 1.0 else 1)
    inv = 2 * inversion_scan_steps(inversion_steps, inversion_mode) * 2 * pairs * fwd
    table = {"dpo step": update, "dro update": update, "dro generation": gen, "dro step": update + gen,
             "smpo inversion": inv, "smpo step": update + inv}
    if workload not in table:
        raise ValueError(f"workload {workload!r}: known {sorted(table)}")
    return float(table[workload])


def loop_corrected(raw: float, body: float, trips: int, model: Optional[float]) -> tuple[float, bool]:
    """XLA's count of a program with one ``trips``-long loop whose body XLA counted once.

    raw: the program's count; body: the loop body's count; model: the model count of the whole loop.
    When raw already covers most of the model (XLA unrolled the loop) nothing is added.
    Returns (count, corrected?).
    """
    if model is not None and raw >= 0.5 * model:
        return raw, False
    return raw + (trips - 1) * body, True


# ---------------------------------------------------------------------------------------------
# A random-weight SD pipeline.

class StubTokenizer:
    """What ``trainer.build_run`` asks of a tokenizer: ``model_max_length`` and __call__ -> input_ids.

    Every caption becomes [BOS, EOS, EOS, ...] (the tokens of ""): costs do not depend on the words.
    """

    def __init__(self, max_length: int, bos: int, eos: int):
        self.model_max_length, self.bos, self.eos = max_length, bos, eos

    def __call__(self, texts, padding=None, max_length=None, truncation=None, return_tensors=None):
        ids = np.full((len(texts), max_length or self.model_max_length), self.eos, np.int32)
        ids[:, 0] = self.bos
        return {"input_ids": ids}


def random_params(shapes, seed: int = 0):
    """Params for a ShapeDtypeStruct tree, drawn on the host: kernels N(0, 1/fan_in), norm scales ~1,
    the rest N(0, 0.02²). Keeps activations O(1) through a deep random UNet so the losses stay finite.
    (numpy, not a jitted init: one random op per leaf makes an XLA program that compiles for minutes.)"""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        n = rng.standard_normal(s.shape, dtype=np.float32)
        if name == "kernel" and len(s.shape) >= 2:
            n *= np.float32(1.0 / math.sqrt(int(np.prod(s.shape[:-1]))))
        elif name == "scale":
            n = 1.0 + np.float32(0.02) * n
        else:
            n *= np.float32(0.02)
        return jnp.asarray(n, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_pipeline(size: Size, dtype, attention_impl: Optional[str] = None, seed: int = 0,
                    with_params: bool = True) -> pipeline_lib.SDPipeline:
    """An ``SDPipeline`` of random fp32 weights: the UNet of ``size`` (compute ``dtype``), a CLIP text
    encoder of ``size.text``, a VAE module without params (only its config is read), a stub tokenizer.
    ``with_params=False`` leaves ShapeDtypeStructs in place of params (nothing is allocated)."""
    unet = unet_lib.unet_from_config(size.unet, source="jaxpref.bench size", dtype=dtype,
                                     attention_impl=attention_impl)
    text_encoder = clip.CLIPTextModel(config=size.text, dtype=dtype)
    unet_shapes = unet_lib.unet_param_shapes(unet)
    ids = jnp.zeros((1, size.text.max_position_embeddings), jnp.int32)
    text_shapes = jax.eval_shape(lambda: text_encoder.init(jax.random.PRNGKey(0), ids))["params"]
    if with_params:
        unet_params, text_params = random_params(unet_shapes, seed), random_params(text_shapes, seed + 1)
    else:
        unet_params, text_params = unet_shapes, text_shapes
    vae = vae_lib.AutoencoderKL(block_out_channels=tuple(size.vae_channels))
    tokenizer = StubTokenizer(size.text.max_position_embeddings, size.text.bos_token_id, size.text.eos_token_id)
    return pipeline_lib.SDPipeline(unet=unet, unet_params=unet_params, vae=vae, vae_params=None,
                                   text_encoder=text_encoder, text_encoder_params=text_params, tokenizer=tokenizer,
                                   scheduler_config=dict(SD15_SCHEDULER), folder="random-weights")


def bench_config(size: Size, objective: str, batch: int, dtype: str, remat: bool, overrides=()):
    """The run config of a benchmark: the base config with the objective's defaults, one micro-batch.

    overrides: "key.path=value" strings (``--set dro.steps_per_trajectory=4``), values read as Python
    literals where they parse, else as strings.
    """
    c = config_lib.base_config()
    c.objective = objective
    c.dtype = dtype
    c.reference_dtype = "bfloat16"
    c.remat = remat
    c.batch_size, c.grad_accum = batch, 1
    c.data.resolution = size.latent * 2 ** (len(size.vae_channels) - 1)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key.path=value, e.g. dro.steps_per_trajectory=4")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node, *path = key.strip().split(".")[::-1]
        target = c
        for part in reversed(path):
            target = target[part]
        target[node] = value
    c.dro.buffer_size = max(c.dro.buffer_size, batch // c.dro.steps_per_trajectory)
    return config_lib.validate(c)


def make_batch(run, batch: int, seed: int = 0) -> dict:
    """Random cached-latent batch in ``step``'s layout (numpy)."""
    rng = np.random.default_rng(seed)
    h, w, ch = run.latent_shape
    shape = (batch, h, w, ch) if run.config.objective == "dro" else (batch, 2, h, w, ch)
    vocab = run.pipeline.text_encoder.config.vocab_size
    ids = rng.integers(0, vocab - 2, (batch, run.text_shape[0])).astype(np.int32)
    ids[:, 0], ids[:, -1] = run.pipeline.tokenizer.bos, run.pipeline.tokenizer.eos
    out = {"input_ids": ids,
           "latent_mean": rng.standard_normal(shape).astype(np.float32) * 4.0,
           "latent_std": np.full(shape, 0.1, np.float32)}
    if run.config.objective == "smpo":
        out["rewards"] = rng.uniform(0.12, 0.28, (batch, 2)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Programs apart from the step.

def generation_program(run):
    """DRO's online negatives alone: captions, x0, then ``Objective.refill_negatives`` into an empty
    buffer (DPM++ over the perturbed grid, one trajectory per steps_per_trajectory pairs)."""
    cfg, objective = run.config, run.objective

    def generate(params, frozen, batch, rng):
        keys = step_lib.pair_keys(rng, batch["input_ids"].shape[0])
        micro = dict(batch, keys=keys)
        text, x0 = objective.captions(frozen, micro), objective.latents(micro)
        buffer = step_lib.empty_negatives_buffer(cfg.dro.buffer_size, run.text_shape, run.latent_shape,
                                                 cfg.dro.num_inference_steps)
        return objective.refill_negatives(buffer, params, frozen, text, x0, keys, jax.random.fold_in(rng, 1))
    return generate


def inversion_program(run):
    """SmPO's inversion alone: both latents of each pair inverted by the policy to (x̃, τ) at t."""
    cfg, objective = run.config, run.objective

    def invert(params, frozen, batch, rng):
        keys = step_lib.pair_keys(rng, batch["input_ids"].shape[0])
        micro = dict(batch, keys=keys)
        text, x0 = objective.captions(frozen, micro), objective.latents(micro)
        t = objective.timesteps(keys)
        both = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
        return diffusion.smpo_invert(objective.eps_fn(params), both(x0[:, 0], x0[:, 1]), both(t, t), run.schedule,
                                     cond=both(text, text), mode=cfg.smpo.inversion,
                                     num_steps=cfg.smpo.inversion_steps)
    return invert


# ---------------------------------------------------------------------------------------------
# Measuring.

def xla_flops(program) -> Optional[float]:
    """XLA's FLOP count of a compiled (or lowered) program; None when XLA reports none."""
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops if flops > 0 else None


def compiled_bytes(compiled) -> Optional[int]:
    """argument + output + temp − alias of a compiled program (its own footprint, per device)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def median_seconds(call, iters: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall seconds of ``call()``, which must block until its results are ready."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def unet_xla_flops(unet, params, size: Size) -> tuple[float, float]:
    """XLA's FLOPs of one image's UNet forward and forward+backward (F, G) at this size."""
    x = jnp.zeros((1, size.latent, size.latent, unet.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    c = jnp.zeros((1, size.text.max_position_embeddings, unet.cross_attention_dim), jnp.float32)
    fwd = lambda p: unet.apply({"params": p}, x, t, c).astype(jnp.float32)  # noqa: E731
    loss = lambda p: jnp.mean(jnp.square(fwd(p)))  # noqa: E731
    # The lowered (pre-optimisation) program's count: within 0.1% of the compiled one for the UNet
    # (its FLOPs are convolutions and matmuls), at no compile.
    f = xla_flops(jax.jit(fwd).lower(params))
    g = xla_flops(jax.jit(jax.value_and_grad(loss)).lower(params))
    return f, g


@dataclasses.dataclass
class Row:
    """One timed workload. FLOPs are per call; seconds the median per call."""
    impl: str
    workload: str
    pairs: int
    seconds: float
    model_flops: Optional[float] = None
    xla_flops: Optional[float] = None
    peak_bytes: Optional[int] = None
    peak_source: str = ""          # "hwm" (device high-water mark), "xla" (compiled), "torch" (max_memory_allocated)
    compile_seconds: Optional[float] = None
    device: str = ""
    notes: str = ""
    times: list = dataclasses.field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        kind = self.device
        d.update(pairs_per_second=self.pairs_per_second,
                 model_tflops_per_s=None if self.model_flops is None else self.model_flops / self.seconds / 1e12,
                 xla_tflops_per_s=None if self.xla_flops is None else self.xla_flops / self.seconds / 1e12,
                 mfu_model=mfu(self.model_flops, self.seconds, kind), mfu_xla=mfu(self.xla_flops, self.seconds, kind),
                 peak_tflops=None if peak_flops(kind) is None else peak_flops(kind) / 1e12)
        return d


def row_from_dict(d: dict) -> Row:
    fields = {f.name for f in dataclasses.fields(Row)}
    return Row(**{k: v for k, v in d.items() if k in fields})


def _fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(rows, title: str = "") -> str:
    """The one table: time, throughput, both FLOP counts with their MFU, peak memory."""
    head = (f"{'impl':<14} {'workload':<15} {'pairs':>5} {'ms/call':>9} {'pairs/s':>8} "
            f"{'TF model':>9} {'TF/s':>7} {'MFU':>6} {'TF xla':>9} {'TF/s':>7} {'MFU':>6} {'peak GiB':>12} "
            f"{'compile s':>9}  notes")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        d = r.as_dict()
        peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f} {r.peak_source}"
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(
            f"{r.impl:<14} {r.workload:<15} {r.pairs:>5} {r.seconds * 1e3:>9.2f} {r.pairs_per_second:>8.2f} "
            f"{_fmt(None if r.model_flops is None else r.model_flops / 1e12, '.4g'):>9} "
            f"{_fmt(d['model_tflops_per_s'], '.4g'):>7} {pct(d['mfu_model']):>6} "
            f"{_fmt(None if r.xla_flops is None else r.xla_flops / 1e12, '.4g'):>9} "
            f"{_fmt(d['xla_tflops_per_s'], '.4g'):>7} {pct(d['mfu_xla']):>6} {peak:>12} "
            f"{_fmt(r.compile_seconds, '.1f'):>9}  {r.notes}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One objective.

def _aot(fn, *args, **jit_kwargs):
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start


def bench_objective(objective: str, size_name: str = "tiny", batch: Optional[int] = None, dtype: str = "float32",
                    remat: bool = False, attention: str = "xla", iters: int = 5, seed: int = 0,
                    unet_flops: Optional[tuple[float, float]] = None, log=print,
                    overrides=()) -> tuple[list[Row], dict]:
    """Times one objective's programs; returns (rows, info). ``unet_flops``: (F, G) to use; default
    METHODS' for sd15, else XLA's batch-1 counts of the lowered UNet."""
    size = SIZES[size_name]
    batch = batch or size.batch
    dev = jax.devices()[0]
    kind = dev.device_kind
    if attention == "cudnn" and (dev.platform != "gpu" or dtype != "bfloat16"):
        raise ValueError(f"--attention cudnn needs a GPU and --dtype bfloat16 (cuDNN flash attention); got {kind}, "
                         f"{dtype}: use --attention xla")
    jdtype = trainer.DTYPES[dtype]
    pipeline = random_pipeline(size, jdtype, None if attention == "xla" else attention, seed)
    config = bench_config(size, objective, batch, dtype, remat, overrides)
    run = trainer.build_run(config, pipeline)
    info = {"overrides": list(overrides), "unet_params": unet_lib.count_params(pipeline.unet_params),
            "latent_shape": list(run.latent_shape), "text_shape": list(run.text_shape)}

    if unet_flops is None:
        if size.fwd_flops is not None:
            unet_flops, source = (size.fwd_flops, size.fwdbwd_flops), "METHODS §0 (SD1.5, 64x64)"
        else:
            # The plain module: remat's recompute and cuDNN's custom calls would skew XLA's count.
            plain = pipeline.unet.clone(remat=False, attention_impl=None)
            unet_flops, source = unet_xla_flops(plain, pipeline.unet_params, size), "xla-unet (batch 1)"
    else:
        source = "given"
    fwd, fwdbwd = unet_flops
    info.update(fwd_flops=fwd, fwdbwd_flops=fwdbwd, flops_source=source)
    flop_kw = dict(gen_steps=config.dro.num_inference_steps, steps_per_trajectory=config.dro.steps_per_trajectory,
                   guidance_scale=config.dro.guidance_scale, inversion_steps=config.smpo.inversion_steps,
                   inversion_mode=config.smpo.inversion)
    flops = lambda w: model_flops(w, batch, fwd, fwdbwd, **flop_kw)  # noqa: E731

    mesh = sharding.make_mesh(data=-1, fsdp=1)
    frozen = trainer.frozen_params(run)
    if config.reference_dtype == "float32":  # the fp32 "cast" aliases the policy's buffers, which the step donates
        frozen = jax.tree_util.tree_map(jnp.copy, frozen)
    state = trainer.initial_state(run)
    state_sh = sharding.state_sharding(mesh, jax.eval_shape(lambda: state))
    frozen_sh = sharding.params_sharding(mesh, frozen)
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    # From here the state owns the policy weights (the step donates them): drop the pipeline's handle so
    # the memory high-water mark holds no second copy.
    run.pipeline = dataclasses.replace(run.pipeline, unet_params=None)
    del pipeline
    batch_np = make_batch(run, batch, seed)
    batch_arr = jax.device_put(batch_np, sharding.rows_sharding(mesh, batch_np))
    rngs = [jax.random.PRNGKey(seed + i) for i in range(iters + 3)]
    common = dict(impl="jax", pairs=batch, device=kind)
    rows = []

    # Loop programs first: the step donates the state (and with it the pipeline's param buffers).
    loop = None
    if objective == "dro" or (objective == "smpo" and config.smpo.inversion != "none"):
        name, program = (("dro generation", generation_program(run)) if objective == "dro"
                         else ("smpo inversion", inversion_program(run)))
        compiled, compile_s = _aot(program, state.params, frozen, batch_arr, rngs[0])
        calls = itertools.count()
        seconds, times = median_seconds(
            lambda: jax.block_until_ready(compiled(state.params, frozen, batch_arr, rngs[next(calls) % len(rngs)])),
            iters)
        trips = config.dro.num_inference_steps if objective == "dro" else inversion_scan_steps(
            config.smpo.inversion_steps, config.smpo.inversion)
        raw = xla_flops(compiled)
        xla, corrected = (None, False) if raw is None else loop_corrected(raw, raw, trips, flops(name))
        loop = (raw, trips, corrected)
        note = f"xla: loop body x{trips}" if corrected else ""
        rows.append(Row(workload=name, seconds=seconds, model_flops=flops(name), xla_flops=xla,
                        compile_seconds=compile_s, notes=note, times=times, **common))
        rows[-1].peak_bytes, rows[-1].peak_source = _peak(compiled)
        log(f"  {name}: {seconds * 1e3:.2f} ms (compile {compile_s:.1f} s)")

    train_step = step_lib.make_train_step(config, run.objective, run.optimizer)
    batch_shapes = jax.eval_shape(lambda: batch_np)
    jitted = sharding.jit_train_step(train_step, mesh, state_sh, frozen_sh, batch_shapes)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch_arr, rngs[0], frozen).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "i": 0}
    del state

    def one_step():
        holder["i"] += 1
        holder["state"], metrics = compiled(holder["state"], batch_arr, rngs[holder["i"] % len(rngs)], frozen)
        jax.block_until_ready((holder["state"], metrics))
        holder.setdefault("first", metrics)
        return metrics

    seconds, times = median_seconds(one_step, iters)
    metrics = jax.device_get(one_step())
    # The first step starts at policy = reference (DPO: loss log 2 up to the bf16 reference's rounding);
    # the last has moved: with random weights the losses saturate within a few steps.
    info["first_metrics"] = {k: float(v) for k, v in jax.device_get(holder.pop("first")).items()}
    info["final_metrics"] = {k: float(v) for k, v in metrics.items()}
    raw = xla_flops(compiled)
    xla, note = raw, ""
    if loop is not None and raw is not None and loop[0] is not None and loop[2]:
        xla, note = raw + (loop[1] - 1) * loop[0], f"xla: loop body x{loop[1]}"
    name = f"{objective} step"
    rows.append(Row(workload=name, seconds=seconds, model_flops=flops(name), xla_flops=xla, compile_seconds=compile_s,
                    notes=note, times=times, **common))
    rows[-1].peak_bytes, rows[-1].peak_source = _peak(compiled)
    log(f"  {name}: {seconds * 1e3:.2f} ms (compile {compile_s:.1f} s), loss first "
        f"{info['first_metrics'].get('loss'):.4g} last {info['final_metrics'].get('loss'):.4g}")

    if objective == "dro":
        gen, stp = rows[0], rows[1]
        upd_s = stp.seconds - gen.seconds
        upd_xla = None if stp.xla_flops is None or gen.xla_flops is None else stp.xla_flops - gen.xla_flops
        rows.append(Row(workload="dro update", seconds=upd_s, model_flops=flops("dro update"), xla_flops=upd_xla,
                        peak_bytes=stp.peak_bytes, peak_source=stp.peak_source,
                        notes="derived: step - generation", **common))
    return rows, info


def _peak(compiled):
    hwm = device_peak_bytes()
    if hwm is not None:
        return hwm, "hwm"
    b = compiled_bytes(compiled)
    return (b, "xla") if b is not None else (None, "")


# ---------------------------------------------------------------------------------------------
# Memory over simulated devices (CPU).

MEMORY_DEVICE_COUNTS = (1, 2, 4, 8)


def _sharded_bytes(shapes, shardings) -> int:
    total = 0
    for s, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(sh.shard_shape(s.shape), dtype=np.int64)) * jnp.dtype(s.dtype).itemsize
    return total


def abstract_run(size_name: str, objective: str = "dpo", pairs: int = 8, dtype: str = "bfloat16",
                 remat: bool = True):
    """(run, state shapes, frozen shapes, batch shapes) of a size without allocating any param."""
    size = SIZES[size_name]
    pipeline = random_pipeline(size, trainer.DTYPES[dtype], with_params=False)
    run = trainer.build_run(bench_config(size, objective, pairs, dtype, remat), pipeline)
    state = jax.eval_shape(lambda p: step_lib.init_train_state(p, run.optimizer, run.config, text_shape=run.text_shape,
                                                               latent_shape=run.latent_shape), pipeline.unet_params)
    ref_dtype = trainer.DTYPES[run.config.reference_dtype]
    frozen = jax.eval_shape(lambda p, t: {"ref": jax.tree_util.tree_map(lambda x: x.astype(ref_dtype), p), "text": t},
                            pipeline.unet_params, pipeline.text_encoder_params)
    batch = jax.eval_shape(lambda: make_batch(run, pairs))
    return run, state, frozen, batch


def state_bytes(size_name: str, devices: int, objective: str = "dpo") -> dict:
    """Per-device bytes of params, optimizer state, frozen reference + text encoder on a (1, devices)
    fsdp mesh, from the shardings of eval_shape'd trees: nothing is allocated or compiled."""
    mesh = sharding.make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])
    _, state, frozen, _ = abstract_run(size_name, objective)
    sh = sharding.state_sharding(mesh, state)
    fsh = sharding.params_sharding(mesh, frozen)
    out = {"devices": devices, "params": _sharded_bytes(state.params, sh.params),
           "opt_state": _sharded_bytes(state.opt_state, sh.opt_state),
           "frozen_ref": _sharded_bytes(frozen["ref"], fsh["ref"]),
           "frozen_text": _sharded_bytes(frozen["text"], fsh["text"])}
    out["params+opt"] = out["params"] + out["opt_state"]
    return out


def compiled_step_memory(size_name: str, devices: int, pairs_per_device: int = 8, objective: str = "dpo",
                         dtype: str = "bfloat16", remat: bool = True) -> dict:
    """Compiles the train step on a (1, devices) fsdp mesh and returns its memory_analysis, per device."""
    mesh = sharding.make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])
    run, state, frozen, batch = abstract_run(size_name, objective, pairs_per_device * devices, dtype, remat)
    sh = sharding.state_sharding(mesh, state)
    fsh = sharding.params_sharding(mesh, frozen)
    with_sh = lambda tree, shs: jax.tree_util.tree_map(  # noqa: E731
        lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), tree, shs)
    train_step = step_lib.make_train_step(run.config, run.objective, run.optimizer)
    jitted = sharding.jit_train_step(train_step, mesh, sh, fsh, batch)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    start = time.perf_counter()
    compiled = jitted.lower(with_sh(state, sh), batch, rng, with_sh(frozen, fsh)).compile()
    m = compiled.memory_analysis()
    return {"devices": devices, "pairs_per_device": pairs_per_device, "compile_seconds": time.perf_counter() - start,
            "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
            "total": int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                         - m.alias_size_in_bytes)}


def memory_worker(args) -> dict:
    """Runs inside the subprocess that has XLA_FLAGS=--xla_force_host_platform_device_count=8."""
    counts = [n for n in MEMORY_DEVICE_COUNTS if n <= len(jax.devices())]
    result = {"device": jax.devices()[0].device_kind, "num_devices": len(jax.devices()),
              "state": {}, "compiled": {}, "notes": []}
    for size_name in args.memory_sizes.split(","):
        result["state"][size_name] = [state_bytes(size_name, n) for n in counts]
    if args.memory_compile != "no":
        for size_name in args.memory_compile_sizes.split(","):
            rows = []
            for n in counts:
                r = compiled_step_memory(size_name, n, args.memory_pairs)
                rows.append(r)
                print(f"  compiled {size_name} on {n} device(s): {r['compile_seconds']:.1f} s", flush=True)
                if args.memory_compile == "auto" and r["compile_seconds"] > args.memory_compile_limit \
                        and n != counts[-1]:
                    result["notes"].append(f"{size_name}: compiling on {n} device(s) took {r['compile_seconds']:.0f} s "
                                           f"> {args.memory_compile_limit:.0f} s; larger meshes skipped")
                    break
            result["compiled"][size_name] = rows
    return result


def format_memory_table(result: dict) -> str:
    gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
    lines = [f"Per-device bytes, mesh (data=1, fsdp=N), DPO, bf16 compute, AdamW; device: {result['device']} "
             f"(simulated host devices)"]
    for size_name, rows in result["state"].items():
        lines.append(f"\n{size_name}: from the shardings of eval_shape'd state (no compile, no allocation), GiB")
        lines.append(f"{'N':>3} {'params':>9} {'opt':>9} {'params+opt':>11} {'x N / 1-dev':>11} {'ref bf16':>9} "
                     f"{'text':>7}")
        base = rows[0]["params+opt"]
        for r in rows:
            lines.append(f"{r['devices']:>3} {gib(r['params']):>9} {gib(r['opt_state']):>9} {gib(r['params+opt']):>11} "
                         f"{r['params+opt'] * r['devices'] / base:>11.3f} {gib(r['frozen_ref']):>9} "
                         f"{gib(r['frozen_text']):>7}")
    for size_name, rows in result["compiled"].items():
        if not rows:
            continue
        lines.append(f"\n{size_name}: compiled train step (remat on), memory_analysis per device on XLA:CPU, "
                     f"{rows[0]['pairs_per_device']} pairs/device, GiB")
        lines.append(f"{'N':>3} {'argument':>9} {'output':>9} {'temp':>9} {'alias':>9} {'total':>9} {'compile s':>9}")
        for r in rows:
            lines.append(f"{r['devices']:>3} {gib(r['argument']):>9} {gib(r['output']):>9} {gib(r['temp']):>9} "
                         f"{gib(r['alias']):>9} {gib(r['total']):>9} {r['compile_seconds']:>9.1f}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def run_memory_table(args) -> dict:
    """Spawns the worker with 8 simulated CPU devices (XLA_FLAGS must precede the jax import)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, "-m", "jaxpref.bench", "--memory-worker", "--json", out,
               "--memory-sizes", args.memory_sizes, "--memory-compile", args.memory_compile,
               "--memory-compile-sizes", args.memory_compile_sizes, "--memory-pairs", str(args.memory_pairs),
               "--memory-compile-limit", str(args.memory_compile_limit)]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# The command line.

def _default_dtype() -> str:
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def _worker_command(args, objective: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "jaxpref.bench", "--no-isolate", "--objectives", objective, "--size", args.size,
           "--attention", args.attention, "--json", out, "--quiet-table"]
    for flag, value in (("--dtype", args.dtype), ("--iters", args.iters), ("--batch", args.batch)):
        if value:
            cmd += [flag, str(value)]
    if args.remat:
        cmd.append("--remat")
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def torch_rows(args, batch: int, dtype: str, iters: int, flops: Optional[tuple] = None) -> tuple[list[Row], list]:
    """The PyTorch reference step (``benchmarks/torch_dpo_step.py``) in its own process, with JAX kept
    off the GPU there: a JAX client in the same process would hold most of the GPU's memory."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "torch_dpo_step.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, script, "--size", args.size, "--batch", str(batch), "--dtype", dtype,
               "--iters", str(iters), "--json", out, "--quiet-table"]
        if flops:
            cmd += ["--fwd-flops", repr(flops[0]), "--fwdbwd-flops", repr(flops[1])]
        if args.torch_compile:
            cmd.append("--compile")
        subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
        with open(out) as f:
            result = json.load(f)
        return [row_from_dict(r) for r in result["rows"]], [f"torch: {e}" for e in result.get("errors", [])]


def _run_here(args, objective: str) -> dict:
    """One objective in this process: the payload a worker writes."""
    dev = jax.devices()[0]
    dtype = args.dtype or _default_dtype()
    iters = args.iters or (3 if dev.platform == "cpu" else 10)
    size = SIZES[args.size]
    batch = args.batch or size.batch
    print(f"{objective}: {args.size}, {batch} pairs, {dtype}, remat={args.remat}, attention={args.attention}, "
          f"{dev.device_kind}", flush=True)
    rows, info = bench_objective(objective, args.size, batch, dtype, args.remat, args.attention, iters,
                                 overrides=args.set)
    return {"device": dev.device_kind, "platform": dev.platform, "num_devices": len(jax.devices()),
            "jax": jax.__version__, "size": args.size, "batch": batch, "dtype": dtype, "remat": args.remat,
            "attention": args.attention, "iters": iters,
            "peak_tflops": None if peak_flops(dev.device_kind) is None else peak_flops(dev.device_kind) / 1e12,
            "objectives": {objective: info}, "rows": [r.as_dict() for r in rows]}


def _run_isolated(args, objective: str) -> Optional[dict]:
    """One objective in a fresh process: its own device high-water mark, all its memory freed after.
    None when the worker failed (out of memory, say): the others still run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        proc = subprocess.run(_worker_command(args, objective, out))
        if proc.returncode != 0 or not os.path.exists(out):
            return None
        with open(out) as f:
            return json.load(f)


def _write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--objectives", default="dpo,dro,smpo")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: the size's)")
    parser.add_argument("--dtype", choices=sorted(trainer.DTYPES), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", choices=["xla", "cudnn"], default="xla")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 10; CPU 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable: --set dro.steps_per_trajectory=4 --set smpo.inversion=paper")
    parser.add_argument("--json", default=None, help="write every number here (rewritten after each objective)")
    parser.add_argument("--torch", action="store_true", help="add the PyTorch reference DPO step (subprocess)")
    parser.add_argument("--torch-compile", action="store_true", help="and its torch.compile row")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run all objectives in this process (peak memory is then a running high-water mark; "
                        "on a GPU, --torch then competes with JAX's preallocation)")
    parser.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-table", action="store_true",
                        help="per-device memory of the SD1.5 DPO step over 1/2/4/8 simulated CPU devices")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-sizes", default="sd15,sd15-narrow")
    parser.add_argument("--memory-compile", choices=["auto", "yes", "no"], default="auto",
                        help="compile the step per mesh for memory_analysis (auto: stop when one compile is slow)")
    parser.add_argument("--memory-compile-sizes", default="sd15")
    parser.add_argument("--memory-pairs", type=int, default=8, help="pairs per device in the compiled step")
    parser.add_argument("--memory-compile-limit", type=float, default=300.0,
                        help="seconds: a compile slower than this stops the larger meshes")
    args = parser.parse_args(argv)

    if args.memory_worker:
        result = memory_worker(args)
        _write_json(args.json, result)
        return result
    if args.memory_table:
        result = run_memory_table(args)
        print(format_memory_table(result))
        _write_json(args.json, result)
        return result

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for o in objectives:
        if o not in step_lib.OBJECTIVES:
            parser.error(f"--objectives: {o!r} not in {step_lib.OBJECTIVES}")
    # Isolated, this process never starts a JAX backend: on a GPU it would hold most of the memory
    # while the workers and the PyTorch process run.
    isolate = not args.no_isolate and (len(objectives) > 1 or args.torch)
    payload, rows = None, []
    torch_pending = args.torch
    failed = []
    for objective in objectives:
        sub = _run_isolated(args, objective) if isolate else _run_here(args, objective)
        if sub is None:
            failed.append(objective)
            print(f"{objective}: the worker failed (its output is above); going on", flush=True)
            continue
        if payload is None:
            payload = {k: v for k, v in sub.items() if k not in ("objectives", "rows")}
            payload["objectives"] = {}
        payload["objectives"].update(sub["objectives"])
        rows += [row_from_dict(r) for r in sub["rows"]]
        payload["rows"] = [r.as_dict() for r in rows]
        _write_json(args.json, payload)
        if torch_pending and (objective == "dpo" or objective == objectives[-1]):
            # Right after JAX's DPO row, so a run cut short still has the comparison.
            info = sub["objectives"][objective]
            print("torch: the PyTorch reference DPO step", flush=True)
            try:
                new_rows, errors = torch_rows(args, payload["batch"], payload["dtype"], payload["iters"],
                                              (info["fwd_flops"], info["fwdbwd_flops"]))
                rows += new_rows
                failed += errors
            except (subprocess.CalledProcessError, OSError) as e:
                failed.append(f"torch ({e})")
            torch_pending = False
            payload["rows"] = [r.as_dict() for r in rows]
            _write_json(args.json, payload)
    if payload is None:
        raise SystemExit(f"every objective failed: {failed}")
    payload["failed"] = failed
    _write_json(args.json, payload)
    if not args.quiet_table:
        info = next(iter(payload["objectives"].values()), {})
        title = (f"{args.size}: {payload['batch']} pairs/step, latents {info.get('latent_shape')}, "
                 f"{payload['dtype']}, remat={args.remat}, attention={args.attention}, device {payload['device']} "
                 f"x{payload['num_devices']}, peak {_fmt(payload['peak_tflops'], '.0f')} TFLOP/s bf16 dense; "
                 f"TF model: F={_fmt(info.get('fwd_flops', 0) / 1e12, '.4g')}, "
                 f"G={_fmt(info.get('fwdbwd_flops', 0) / 1e12, '.4g')} TFLOP/image ({info.get('flops_source')}); "
                 f"TF xla: compiled cost_analysis" + (f"; config: {' '.join(args.set)}" if args.set else ""))
        print(format_table(rows, title))
        if failed:
            print(f"failed: {', '.join(failed)}")
    return payload


if __name__ == "__main__":
    main()
