"""Benchmark suite of the train step: DPO, DRO and SmPO steps with cached latents, random weights.

  python benchmarks/bench.py                                   # CPU smoke: tiny UNet, 8x8 latents, all three
  python benchmarks/bench.py --size sd15 --batch 8 --torch --torch-compile --json $OUT/bench.json   # one H100
  python benchmarks/bench.py --memory-table --json $OUT/memory.json    # CPU: per-device bytes over 1/2/4/8 devices

Rows (one table, ``--json`` writes every number): the DPO step; DRO's DPM++-20 negative generation alone,
its whole step and the update (step − generation, derived); SmPO's inversion alone and its whole step;
with ``--torch`` the PyTorch reference DPO step (``benchmarks/torch_dpo_step.py``, diffusers UNet, SDPA,
bf16) run in a subprocess on the same device. Every row is jitted (compile and 2 warm-up calls
excluded) and timed as the median of ``--iters`` calls with ``block_until_ready``. The step runs as the
training loop runs it: the state from ``trainer.init_state`` (born sharded), the step from
``trainer.compile_train_step`` (explicit shardings, donated state), its new state fed back. Weights are
random: the time does not depend on their values.

Model FLOPs and MFU come from ``jaxpref.flops`` (the FLOP model is its docstring; ``--help`` prints it). F and G: sd15
uses the measured counts (F = 0.80 TFLOP, G = 2.36 TFLOP per image at 64×64); other sizes use XLA's cost
analysis of a batch-1 UNet forward and forward+backward ("xla-unet").

The second count ("xla") is ``jitted.lower(...).compile().cost_analysis()['flops']`` of each program.
XLA counts a while loop's body once (not × its trip count, checked on CPU) and a ``lax.cond`` once,
so the scans of DRO's sampler and SmPO's inversion are corrected: a standalone generation/inversion
program whose count is under half the model's is taken as one loop body, the loop count is
``trips × raw``, and the step's is ``raw + (trips − 1) × body``. XLA also counts remat's recompute,
and nothing inside custom calls (cuDNN flash attention): read it as a cross-check, not as the MFU.

``--profile DIR`` traces a few steps after the timed ones (``jax.profiler``, viewable in TensorBoard or
Perfetto) and sums the trace by kernel kind and by phase of the step (``profile_breakdown.py``).

Peak memory: ``jax.devices()[0].memory_stats()['peak_bytes_in_use']`` (the process high-water mark;
each objective runs in its own subprocess when several are asked for) where the backend reports it
("hwm"), else the compiled ``memory_analysis()``: argument + output + temp − alias ("xla").

Modules beside this script: ``random_sd.py`` (sizes, random-weight pipeline, config, batch),
``measure.py`` (timing, XLA counts, the table), ``memory_table.py`` (``--memory-table``),
``profile_breakdown.py`` (``--profile``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

# Runnable from any folder: the repository root first (jaxpref), then this folder (its sibling modules).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpref import config_lib, diffusion, flops as flop_model, sharding, trainer  # noqa: E402
from jaxpref.flops import loop_corrected, model_flops, peak_flops  # noqa: E402
from jaxpref.methods.smpo import inversion_scan_steps  # noqa: E402
from jaxpref.methods import METHODS  # noqa: E402
from jaxpref.methods.base import pair_keys  # noqa: E402
from jaxpref.methods.dro import empty_negatives_buffer  # noqa: E402
from jaxpref.step import policy_params  # noqa: E402
from jaxpref.models.unet import count_params  # noqa: E402
from measure import (Row, fmt, format_table, mark_failed, median_seconds, parse_share, peak, row_from_dict,  # noqa: E402
                     timing_turn, unet_xla_flops, xla_flops)
import profile_breakdown  # noqa: E402
from memory_table import format_memory_table, memory_worker, run_memory_table  # noqa: E402
from random_sd import SIZES, bench_config, make_batch, random_pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Programs apart from the step.

def generation_program(run):
    """DRO's online negatives alone: captions, x0, then ``DRO.refill_negatives`` into an empty
    buffer (DPM++ over the perturbed grid, one trajectory per steps_per_trajectory pairs)."""
    cfg, method = run.config, run.method

    def generate(params, frozen, batch, rng):
        keys = pair_keys(rng, batch["input_ids"].shape[0])
        micro = dict(batch, keys=keys)
        text, x0 = method.captions(frozen, micro), method.latents(micro)
        buffer = empty_negatives_buffer(cfg.dro.buffer_size, run.text_shape, run.latent_shape,
                                        cfg.dro.num_inference_steps)
        sampler = policy_params(cfg, params, frozen, rng)  # with LoRA: the base and these adapters
        return method.refill_negatives(buffer, sampler, frozen, text, x0, keys, jax.random.fold_in(rng, 1))
    return generate


def inversion_program(run):
    """SmPO's inversion alone: both latents of each pair inverted by the policy to (x̃, τ) at t."""
    cfg, method = run.config, run.method

    def invert(params, frozen, batch, rng):
        keys = pair_keys(rng, batch["input_ids"].shape[0])
        micro = dict(batch, keys=keys)
        text, x0 = method.captions(frozen, micro), method.latents(micro)
        t = method.timesteps(keys)
        both = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
        inverter = policy_params(cfg, params, frozen, rng)  # with LoRA: the base and these adapters
        return diffusion.smpo_invert(method.eps_fn(inverter), both(x0[:, 0], x0[:, 1]), both(t, t), run.schedule,
                                     cond=both(text, text), mode=cfg.smpo.inversion,
                                     num_steps=cfg.smpo.inversion_steps)
    return invert


# ---------------------------------------------------------------------------------------------
# A profile of the timed step.

PROFILE_STEPS = 3


def profile_steps(one_step, compiled, folder: str, step_seconds: float, log=print) -> dict:
    """``PROFILE_STEPS`` calls of ``one_step`` under ``jax.profiler`` into ``folder`` (TensorBoard's profile
    plugin or Perfetto read it), with the compiled step's HLO beside it; returns the trace's breakdown by
    kernel kind and phase (``profile_breakdown``)."""
    os.makedirs(folder, exist_ok=True)
    hlo = compiled.as_text()
    with gzip.open(os.path.join(folder, "step.hlo.txt.gz"), "wt") as f:
        f.write(hlo)
    jax.profiler.start_trace(folder)
    try:
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            one_step()
        traced_s = time.perf_counter() - start
    finally:
        jax.profiler.stop_trace()
    summary = profile_breakdown.jax_breakdown(folder, PROFILE_STEPS, hlo)
    summary["traced_ms_per_step"] = 1e3 * traced_s / PROFILE_STEPS  # wall time of the traced steps
    log(profile_breakdown.format_breakdown(summary, f"  profile ({folder})", step_seconds * 1e3))
    return summary


# ---------------------------------------------------------------------------------------------
# One objective.

def _aot(fn, *args, **jit_kwargs):
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _abstract(tree, shardings):
    """ShapeDtypeStructs of ``tree`` placed as ``shardings``: what a program compiles for, nothing allocated."""
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _frozen_shapes(run):
    """The shapes of ``trainer.frozen_params(run)`` from a pipeline of ShapeDtypeStructs."""
    pipe = run.pipeline

    def frozen(unet_params, text_params):
        filled = dataclasses.replace(pipe, unet_params=unet_params, text_encoder_params=text_params)
        return trainer.frozen_params(dataclasses.replace(run, pipeline=filled))
    return jax.eval_shape(frozen, pipe.unet_params, pipe.text_encoder_params)


def _abstract_arguments(run, mesh, batch_np):
    """The step's state, frozen params and batch as ShapeDtypeStructs placed as the training loop places them."""
    state_shapes, state_shardings = trainer.abstract_state(run, mesh)
    frozen_shapes = _frozen_shapes(run)
    return (_abstract(state_shapes, state_shardings),
            _abstract(frozen_shapes, trainer.frozen_shardings(run, mesh, frozen_shapes)),
            _abstract(jax.eval_shape(lambda b: b, batch_np), sharding.rows_sharding(mesh, batch_np)))


def _shardings(abstract):
    return jax.tree_util.tree_map(lambda s: s.sharding, abstract)


def bench_objective(objective: str, size_name: str = "tiny", batch: Optional[int] = None, dtype: str = "float32",
                    remat: bool = False, attention: str = "xla", iters: int = 5, seed: int = 0,
                    unet_flops: Optional[tuple[float, float]] = None, log=print,
                    overrides=(), share: Optional[tuple] = None,
                    profile: Optional[str] = None) -> tuple[list[Row], dict]:
    """Times one objective's programs; returns (rows, info). ``unet_flops``: (F, G) to use; default
    the measured ones for sd15, else XLA's batch-1 counts of the lowered UNet. ``share``: (DIR, N[, RANK])
    when N bench processes share the device (``measure.timing_turn``). ``profile``: a folder for a
    jax.profiler trace of ``PROFILE_STEPS`` steps, summarised in ``info['profile']``.

    The programs compile for the arguments' shapes and shardings before any weight exists: a process
    waiting for its turn on a shared GPU holds no state."""
    size = SIZES[size_name]
    batch = batch or size.batch
    dev = jax.devices()[0]
    kind = dev.device_kind
    if attention.startswith("cudnn") and (dev.platform != "gpu" or dtype != "bfloat16"):
        raise ValueError(f"--attention {attention} needs a GPU and --dtype bfloat16 (cuDNN flash attention); got "
                         f"{kind}, {dtype}: use --attention xla")
    jdtype = config_lib.DTYPES[dtype]
    shapes = random_pipeline(size, jdtype, None if attention == "xla" else attention, seed, with_params=False)
    config = bench_config(size, objective, batch, dtype, remat, overrides, attention)
    run = trainer.build_run(config, shapes)
    info = {"overrides": list(overrides), "unet_params": count_params(shapes.unet_params),
            "latent_shape": list(run.latent_shape), "text_shape": list(run.text_shape)}

    if unet_flops is None:
        if size.fwd_flops is not None:
            unet_flops, source = (size.fwd_flops, size.fwdbwd_flops), "measured (SD1.5, 64x64)"
        else:
            # The plain module: remat's recompute and cuDNN's custom calls would skew XLA's count.
            plain = shapes.unet.clone(remat=False, attention_impl=None)
            unet_flops, source = unet_xla_flops(plain, shapes.unet_params, size), "xla-unet (batch 1)"
    else:
        source = "given"
    fwd, fwdbwd = unet_flops
    info.update(fwd_flops=fwd, fwdbwd_flops=fwdbwd, flops_source=source)
    flops = lambda w: model_flops(w, batch, fwd, fwdbwd, config)  # noqa: E731

    mesh = sharding.make_mesh(data=-1, fsdp=1)
    batch_np = make_batch(run, batch, seed)
    abstract_state, abstract_frozen, abstract_batch = _abstract_arguments(run, mesh, batch_np)
    rngs = [jax.random.PRNGKey(seed + i) for i in range(iters + 3 + PROFILE_STEPS)]
    common = dict(impl="jax", pairs=batch, device=kind)
    rows = []

    has_part = objective == "dro" or (objective == "smpo" and config.smpo.inversion != "none")
    if has_part:
        part_name, program = (("dro generation", generation_program(run)) if objective == "dro"
                              else ("smpo inversion", inversion_program(run)))
        part_compiled, part_compile_s = _aot(program, abstract_state.params, abstract_frozen, abstract_batch, rngs[0])
        log(f"  {part_name}: compiled in {part_compile_s:.1f} s")
    start = time.perf_counter()
    compiled = trainer.compile_train_step(run, mesh, abstract_state, abstract_batch, abstract_frozen, rngs[0])
    compile_s = time.perf_counter() - start
    log(f"  {objective} step: compiled in {compile_s:.1f} s")

    # The weights, drawn in host memory while the device may still be another process's (seconds for SD1.5).
    weights = random_pipeline(size, jdtype, None if attention == "xla" else attention, seed, on_host=True)
    with timing_turn(share, log):
        # On the device, and the state born sharded, as the training loop builds them.
        run.pipeline = weights
        frozen = jax.device_put(trainer.frozen_params(run), _shardings(abstract_frozen))
        state, _, _ = trainer.init_state(run, mesh)
        # From here the state owns the policy weights (the step donates them): drop the pipeline's handle so
        # the memory high-water mark holds no second copy.
        run.pipeline = shapes
        del weights
        batch_arr = jax.device_put(batch_np, _shardings(abstract_batch))
        loop = None
        if has_part:
            calls = itertools.count()
            seconds, times = median_seconds(
                lambda p=state.params: jax.block_until_ready(
                    part_compiled(p, frozen, batch_arr, rngs[next(calls) % len(rngs)])), iters)
            trips = (config.dro.num_inference_steps if objective == "dro"
                     else inversion_scan_steps(config.smpo, run.schedule))
            raw = xla_flops(part_compiled)
            xla, corrected = (None, False) if raw is None else loop_corrected(raw, raw, trips, flops(part_name))
            loop = (raw, trips, corrected)
            note = f"xla: loop body x{trips}" if corrected else ""
            rows.append(Row(workload=part_name, seconds=seconds, model_flops=flops(part_name), xla_flops=xla,
                            compile_seconds=part_compile_s, notes=note, times=times, **common))
            rows[-1].peak_bytes, rows[-1].peak_source = peak(part_compiled)
            log(f"  {part_name}: {seconds * 1e3:.2f} ms (compile {part_compile_s:.1f} s)")

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
        if profile:
            try:
                info["profile"] = profile_steps(one_step, compiled, os.path.join(profile, objective), seconds, log)
            except Exception as e:  # noqa: BLE001 - a trace we cannot read must not cost the timed row
                info["profile_error"] = f"{type(e).__name__}: {e}"
                log(f"  profile failed: {info['profile_error']}")
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
    rows[-1].peak_bytes, rows[-1].peak_source = peak(compiled)
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


# ---------------------------------------------------------------------------------------------
# The command line.

def _default_dtype() -> str:
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def _share_arg(value: str) -> tuple:
    try:
        return parse_share(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _worker_command(args, objective: str, out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--no-isolate", "--objectives", objective, "--size", args.size,
           "--attention", args.attention, "--json", out, "--quiet-table"]
    for flag, value in (("--dtype", args.dtype), ("--iters", args.iters), ("--batch", args.batch)):
        if value:
            cmd += [flag, str(value)]
    if args.remat:
        cmd.append("--remat")
    if args.profile:
        cmd += ["--profile", args.profile]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def torch_rows(args, batch: int, dtype: str, iters: int, flops: Optional[tuple] = None) -> tuple[list[Row], list]:
    """The PyTorch reference step (``benchmarks/torch_dpo_step.py``) in its own process, with JAX kept
    off the GPU there: a JAX client in the same process would hold most of the GPU's memory."""
    script = os.path.join(HERE, "torch_dpo_step.py")
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
    try:
        rows, info = bench_objective(objective, args.size, batch, dtype, args.remat, args.attention, iters,
                                     overrides=args.set, share=args.share_device, profile=args.profile)
    except BaseException:
        mark_failed(args.share_device)
        raise
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
    parser = argparse.ArgumentParser(description=f"{__doc__}\njaxpref.flops: {flop_model.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--objectives", default="dpo,dro,smpo")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: the size's)")
    parser.add_argument("--dtype", choices=sorted(config_lib.DTYPES), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", choices=["xla", "cudnn", "cudnn_padded", "chunked"], default="xla")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 10; CPU 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable: --set dro.steps_per_trajectory=4 --set smpo.inversion=paper")
    parser.add_argument("--json", default=None, help="write every number here (rewritten after each objective)")
    parser.add_argument("--torch", action="store_true", help="add the PyTorch reference DPO step (subprocess)")
    parser.add_argument("--torch-compile", action="store_true", help="and its torch.compile row")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run all objectives in this process (peak memory is then a running high-water mark; "
                        "on a GPU, --torch then competes with JAX's preallocation)")
    parser.add_argument("--share-device", default=None, metavar="DIR:N[:RANK]", type=_share_arg,
                        help="N bench commands started together on one GPU: all compile at once (holding no "
                        "weights), then they time one at a time, in RANK order where given (markers in DIR, a fresh "
                        "folder per group); run them with XLA_PYTHON_CLIENT_PREALLOCATE=false")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help=f"after timing, trace {PROFILE_STEPS} steps with jax.profiler into DIR/<objective> and "
                        "put their breakdown (kernel kinds, phases, busy time) in the JSON")
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
    if args.profile and hasattr(jax.config, "jax_compilation_cache_include_metadata_in_key"):
        jax.config.update("jax_compilation_cache_include_metadata_in_key", True)  # a cached step: current op names

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
        if o not in METHODS:
            parser.error(f"--objectives: {o!r} not in {tuple(METHODS)}")
    if args.share_device and (len(objectives) > 1 or args.torch):
        parser.error("--share-device: one objective per command and no --torch (the commands of a group run at once)")
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
                 f"x{payload['num_devices']}, peak {fmt(payload['peak_tflops'], '.0f')} TFLOP/s bf16 dense; "
                 f"TF model: F={fmt(info.get('fwd_flops', 0) / 1e12, '.4g')}, "
                 f"G={fmt(info.get('fwdbwd_flops', 0) / 1e12, '.4g')} TFLOP/image ({info.get('flops_source')}); "
                 f"TF xla: compiled cost_analysis" + (f"; config: {' '.join(args.set)}" if args.set else ""))
        print(format_table(rows, title))
        if failed:
            print(f"failed: {', '.join(failed)}")
    return payload


if __name__ == "__main__":
    main()
