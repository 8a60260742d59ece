"""The GPU memory of a benchmark step, predicted on a host without a GPU, beside the peak a GPU measured.

Compiles ``bench.py``'s step (the same config: random-weight SD shapes, one micro-batch, the objective's
defaults, ``--set`` overrides) for an NVIDIA GPU target with ``jaxpref.aot`` (``jaxpref.gpu_targets``: JAX's
CUDA plugin, no device) and reports the compiled program's peak bytes. ``--measured`` names a ``bench.py`` JSON
from a GPU: its row of the same step gives the allocator's high-water mark, and the JSON the two side by side.

  python benchmarks/gpu_memory.py --objective dpo --target h200 \
      --measured benchmarks/results/gpu/sd15_b8_cudnn_dpo_second_machine.json
  -> results/gpu_aot/sd15_b8_cudnn[_remat]_<objective>[_<sets>]_<target>.json

Needs ``pip install -U 'jax[cuda12]'``; an SD1.5 step compiles in 2-4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import random_sd  # benchmarks/ is the script's folder
from jaxpref import aot, gpu_targets

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_aot")
HUB_IDS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}  # the architecture aot reads from presets


def measured_peak(path: str, objective: str) -> int | None:
    """The high-water mark of JAX's ``<objective> step`` row in a bench.py JSON."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    peaks = [r["peak_bytes"] for r in rows if r.get("impl") == "jax" and r.get("workload") == f"{objective} step"]
    return peaks[0] if peaks else None


def predict(args) -> dict:
    config = random_sd.bench_config(random_sd.SIZES[args.size], args.objective, args.batch, "bfloat16", args.remat,
                                    [f"model_path={HUB_IDS[args.size]}", *args.set], args.attention)
    report = aot.check(config, args.target)
    out = {"target": args.target, "size": args.size, "objective": args.objective, "batch": args.batch,
           "attention": args.attention, "remat": args.remat, "sets": args.set, "report": report,
           "predicted_peak_bytes": report["memory"]["total"]}
    if args.measured:
        peak = measured_peak(args.measured, args.objective)
        out.update(measured_file=os.path.relpath(args.measured, os.path.dirname(OUT)), measured_peak_bytes=peak,
                   predicted_over_measured=out["predicted_peak_bytes"] / peak if peak else None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="dpo")
    p.add_argument("--target", default="h200", help="a GPU of jaxpref.gpu_targets: h100, h200, a100 (xN)")
    p.add_argument("--size", default="sd15", choices=sorted(HUB_IDS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--set", action="append", default=[], help="config override key=value (bench.py's --set)")
    p.add_argument("--measured", help="a bench.py JSON from a GPU with the same step")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    gpu_targets.prepare_host()   # before JAX starts a backend (importing it starts none)
    try:
        out = predict(args)
    except ValueError as e:
        print(f"gpu_memory.py: {e}", file=sys.stderr)
        return 2
    sets = "".join(f"_{s.replace('=', '-')}" for s in args.set)
    remat = "_remat" if args.remat else ""
    path = os.path.join(args.out, f"{args.size}_b{args.batch}_{args.attention}{remat}_{args.objective}{sets}_"
                                  f"{args.target}.json")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    line = f"{args.objective} on {args.target}: predicted peak {out['predicted_peak_bytes'] / 2 ** 30:.3f} GiB"
    if out.get("measured_peak_bytes"):
        line += (f", measured {out['measured_peak_bytes'] / 2 ** 30:.3f} GiB "
                 f"({100 * (out['predicted_over_measured'] - 1):+.2f}%)")
    print(f"{line} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
