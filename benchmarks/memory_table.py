"""Per-device memory of the train step over 1/2/4/8 simulated CPU devices (``bench.py --memory-table``).

Two tables on a (data=1, fsdp=N) mesh: the state's and frozen params' bytes per device from the shardings
of ``trainer.abstract_state`` (eval_shape: nothing allocated, nothing compiled), and the step compiled by
``trainer.compile_train_step`` from ShapeDtypeStructs, with its ``memory_analysis()`` per device.
The worker runs in a subprocess: ``--xla_force_host_platform_device_count`` must precede the jax import.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import config_lib, sharding, trainer
from random_sd import SIZES, bench_config, make_batch, random_pipeline

MEMORY_DEVICE_COUNTS = (1, 2, 4, 8)
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def _sharded_bytes(shapes, shardings) -> int:
    total = 0
    for s, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(sh.shard_shape(s.shape), dtype=np.int64)) * jnp.dtype(s.dtype).itemsize
    return total


def frozen_shapes(run):
    """Shapes of ``trainer.frozen_params(run)`` for a run whose params are ShapeDtypeStructs."""
    def frozen(unet_params, text_params):
        pipeline = dataclasses.replace(run.pipeline, unet_params=unet_params, text_encoder_params=text_params)
        return trainer.frozen_params(dataclasses.replace(run, pipeline=pipeline))
    return jax.eval_shape(frozen, run.pipeline.unet_params, run.pipeline.text_encoder_params)


def fsdp_mesh(devices: int):
    return sharding.make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])


def abstract_run(size_name: str, mesh, objective: str = "dpo", pairs: int = 8, dtype: str = "bfloat16",
                 remat: bool = True):
    """A size's run without allocating any param: (run, (state shapes, state shardings), (frozen shapes,
    frozen shardings), batch shapes), the state's from ``trainer.abstract_state`` on ``mesh``."""
    size = SIZES[size_name]
    pipeline = random_pipeline(size, config_lib.DTYPES[dtype], with_params=False)
    run = trainer.build_run(bench_config(size, objective, pairs, dtype, remat), pipeline)
    state = trainer.abstract_state(run, mesh)
    frozen = frozen_shapes(run)
    batch = jax.eval_shape(lambda: make_batch(run, pairs))
    return run, state, (frozen, trainer.frozen_shardings(run, mesh, frozen)), batch


def state_bytes(size_name: str, devices: int, objective: str = "dpo") -> dict:
    """Per-device bytes of params, optimizer state, frozen reference + text encoder on a (1, devices)
    fsdp mesh, from the shardings of eval_shape'd trees: nothing is allocated or compiled."""
    _, (state, sh), (frozen, fsh), _ = abstract_run(size_name, fsdp_mesh(devices), objective)
    out = {"devices": devices, "params": _sharded_bytes(state.params, sh.params),
           "opt_state": _sharded_bytes(state.opt_state, sh.opt_state),
           "frozen_ref": _sharded_bytes(frozen["ref"], fsh["ref"]) if "ref" in frozen else 0,
           "frozen_text": _sharded_bytes(frozen["text"], fsh["text"])}
    out["params+opt"] = out["params"] + out["opt_state"]
    return out


def compiled_step_memory(size_name: str, devices: int, pairs_per_device: int = 8, objective: str = "dpo",
                         dtype: str = "bfloat16", remat: bool = True) -> dict:
    """Compiles the train step on a (1, devices) fsdp mesh and returns its memory_analysis, per device."""
    mesh = fsdp_mesh(devices)
    run, (state, _), (frozen, _), batch = abstract_run(size_name, mesh, objective, pairs_per_device * devices,
                                                       dtype, remat)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(run, mesh, state, batch, frozen, rng)
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
        cmd = [sys.executable, BENCH_SCRIPT, "--memory-worker", "--json", out,
               "--memory-sizes", args.memory_sizes, "--memory-compile", args.memory_compile,
               "--memory-compile-sizes", args.memory_compile_sizes, "--memory-pairs", str(args.memory_pairs),
               "--memory-compile-limit", str(args.memory_compile_limit)]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)
