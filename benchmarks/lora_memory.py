"""Memory of SD1.5 Diffusion-DPO with LoRA against the full fine-tune, on one device.

Two parts: the state's bytes (params, optimizer state, frozen base/reference and text encoder) of both
from ``trainer.abstract_state`` (eval_shape: nothing allocated, nothing compiled), and the LoRA train step
compiled by ``trainer.compile_train_step`` from ShapeDtypeStructs with its ``memory_analysis()``
(argument + output + temp - alias). Without a TPU at hand the compile is XLA:CPU's: its temp bytes
follow CPU fusion and scheduling decisions, so they are an estimate of a TPU's, not a measurement.

  nice -n 10 python benchmarks/lora_memory.py --pairs 4 --json benchmarks/results/lora_memory_sd15.json
  nice -n 10 python benchmarks/lora_memory.py --pairs 4 --grad-accum 2 --json benchmarks/results/lora_memory_sd15_ga2.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from jaxpref import trainer
from memory_table import _sharded_bytes, frozen_shapes, fsdp_mesh
from random_sd import SIZES, bench_config, make_batch, random_pipeline

V5E_HBM = 16 * 2 ** 30  # one TPU v5e chip


def abstract_run(size_name: str, pairs: int, lora_rank: int, attention: str, grad_accum: int = 1, remat: bool = True):
    """(run, state shapes, state shardings, frozen shapes, batch shapes) on one device, LoRA when rank > 0."""
    size = SIZES[size_name]
    pipeline = random_pipeline(size, jnp.bfloat16, with_params=False)
    overrides = (f"lora.enabled={lora_rank > 0}", f"lora.rank={max(lora_rank, 1)}", f"lora.alpha={float(max(lora_rank, 1))}",
                 f"grad_accum={grad_accum}")
    run = trainer.build_run(bench_config(size, "dpo", pairs, "bfloat16", remat, overrides, attention), pipeline)
    mesh = fsdp_mesh(1)
    state, shardings = trainer.abstract_state(run, mesh)
    return run, mesh, state, shardings, frozen_shapes(run), jax.eval_shape(lambda: make_batch(run, pairs))


def device_name() -> str:
    """The device in words; on XLA:CPU also the host's processor (its model from /proc/cpuinfo)."""
    d = jax.devices()[0]
    name = f"{d.platform}: {d.device_kind}"
    if d.platform == "cpu" and os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        name += f" (XLA:CPU on {model}, {os.cpu_count()} cores)" if model else ""
    return name


def state_bytes(state, shardings, frozen) -> dict:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rep = lambda tree: jax.tree_util.tree_map(lambda _: one, tree)  # noqa: E731
    out = {"params": _sharded_bytes(state.params, shardings.params),
           "opt_state": _sharded_bytes(state.opt_state, shardings.opt_state),
           "frozen_base_ref": _sharded_bytes(frozen["ref"], rep(frozen["ref"])),
           "frozen_text": _sharded_bytes(frozen["text"], rep(frozen["text"]))}
    out["total"] = sum(out.values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd15")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (one micro-batch)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (pairs / grad_accum each)")
    p.add_argument("--attention", default="auto",
                   help="the UNet's attention backend; 'auto' picks 'chunked' off GPU for 64x64 latents, as on a TPU "
                        "(the dense 'xla' path materialises 4096^2 maps: docs/performance.md)")
    p.add_argument("--no-compile", action="store_true", help="state bytes only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = {"device": device_name(), "size": args.size,
              "objective": "dpo", "dtype": "bfloat16 compute, fp32 params, bf16 frozen base", "remat": True,
              "pairs": args.pairs, "grad_accum": args.grad_accum, "lora_rank": args.rank, "attention": args.attention, "state": {}}
    for name, rank in (("full", 0), ("lora", args.rank)):
        _, _, state, sh, frozen, _ = abstract_run(args.size, args.pairs, rank, args.attention)
        result["state"][name] = state_bytes(state, sh, frozen)
        result["state"][name]["trained_params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    if not args.no_compile:
        run, mesh, state, _, frozen, batch = abstract_run(args.size, args.pairs, args.rank, args.attention,
                                                              args.grad_accum)
        start = time.perf_counter()
        compiled = trainer.compile_train_step(run, mesh, state, batch, frozen, jax.ShapeDtypeStruct((2,), jnp.uint32))
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        result["compiled_lora"] = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
                                   "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
                                   "total": int(total), "compile_seconds": time.perf_counter() - start,
                                   "fits_16GiB": bool(total < V5E_HBM)}
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def format_table(result: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.3f}"  # noqa: E731
    lines = [f"{result['size']} DPO, {result['pairs']} pairs in {result['grad_accum']} micro-batch(es), "
             f"{result['attention']} attention, one device "
             f"({result['device']}), GiB",
             f"{'':6} {'trained':>11} {'params':>8} {'opt':>8} {'base/ref':>9} {'text':>7} {'state':>8}"]
    for name, s in result["state"].items():
        lines.append(f"{name:6} {s['trained_params']:>11,} {gib(s['params']):>8} {gib(s['opt_state']):>8} "
                     f"{gib(s['frozen_base_ref']):>9} {gib(s['frozen_text']):>7} {gib(s['total']):>8}")
    c = result.get("compiled_lora")
    if c:
        lines.append(f"LoRA r={result['lora_rank']} step compiled (remat), memory_analysis: argument {gib(c['argument'])}"
                     f", output {gib(c['output'])}, temp {gib(c['temp'])}, alias {gib(c['alias'])}, total "
                     f"{gib(c['total'])} (fits 16 GiB: {c['fits_16GiB']}; compile {c['compile_seconds']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
