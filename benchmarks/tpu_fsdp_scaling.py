"""Params + optimizer bytes per chip of the SD1.5 train state over fsdp = 1, 2, 4, 8 on TPU v5e devices.

From the shardings ``python -m jaxpref.aot`` compiles with (``aot.Program.argument_bytes``): eval_shape only,
nothing compiled or allocated, so the numbers are exact and take seconds. Prints a table and writes
benchmarks/results/tpu_aot/sd15_<objective>_fsdp_scaling_v5e.json.

  python benchmarks/tpu_fsdp_scaling.py [--objective dpo]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax

from jaxpref import aot, config_lib, sharding

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_aot")
CONFIGS = {"dpo": "dposd15", "dro": "drosd15", "smpo": "smposd15"}


def scaling(objective: str, topology: str = "v5e:2x4") -> dict:
    c = config_lib.load_config(CONFIGS[objective])
    c.batch_size, c.grad_accum, c.remat = 8, 1, True
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dro.buffer_size = max(c.dro.buffer_size, 8)
    devices = aot.topology_devices(topology)
    program = aot.build_program(c, devices)
    rows = []
    for n in (1, 2, 4, 8):
        args = dataclasses.replace(program, mesh=sharding.make_mesh(1, n, devices=devices[:n])).argument_bytes()
        rows.append({"fsdp": n, **{k: v for k, v in args.items() if k != "batch"}})
    base = rows[0]["params"] + rows[0]["optimizer"]
    for r in rows:
        r["params+optimizer"] = r["params"] + r["optimizer"]
        r["x_fsdp_over_fsdp1"] = r["params+optimizer"] * r["fsdp"] / base
    return {"what": f"SD1.5 {objective} train state per chip over fsdp (data=1), bytes, from the shardings",
            "device_kind": devices[0].device_kind, "jax": jax.__version__, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="dpo", choices=tuple(CONFIGS))
    args = parser.parse_args()
    result = scaling(args.objective)
    gib = lambda b: f"{b / 2**30:9.3f}"  # noqa: E731
    print(f"{result['what']} ({result['device_kind']}), GiB")
    print(f"{'fsdp':>4} {'params':>9} {'optimizer':>9} {'p+opt':>9} {'x N / 1':>8} {'other':>9} {'reference':>9} {'text':>9}")
    for r in result["rows"]:
        print(f"{r['fsdp']:>4} {gib(r['params'])} {gib(r['optimizer'])} {gib(r['params+optimizer'])} "
              f"{r['x_fsdp_over_fsdp1']:>8.3f} {gib(r['other_state'])} {gib(r['reference'])} {gib(r['text_encoder'])}")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"sd15_{args.objective}_fsdp_scaling_v5e.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
