"""The GPU sweep in one run: JAX's DPO step, torch.compile's, and the variants that may beat it.

  bash benchmarks/gpu_bench.sh OUT 560                     # STAGE=sweep: wheels, device facts, then this
  python benchmarks/sweep.py --out OUT --seconds 560       # on a GPU
  python benchmarks/sweep.py --out OUT --size tiny --attention xla --only jax-dpo,jax-dpo-b16   # CPU check

Each variant (``VARIANTS``) is its own process (``bench.py`` or ``torch_dpo_step.py``) of one group
(``--share-device DIR:N:RANK``): all compile at once, holding no weights (the compiles are host work,
minutes each), then they time one at a time in the table's order, so the rows that matter most come first
if the run is cut short. The baseline and torch.compile rows compile at full priority, the others niced;
a variant other than those two still compiling at ``--compile-deadline`` is stopped (timing beside its
GPU autotuning would disturb the others); at ``--seconds`` everything is. The baseline and
torch.compile rows also trace 3 steps (``--profile``): ``profile_breakdown`` says where each spends its
time. Writes OUT/<variant>.json and .log, OUT/profile/, and OUT/sweep.json: every variant's step time,
MFU and peak memory beside the baseline's and torch.compile's of the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    tool: str                   # "jax" (bench.py) or "torch" (torch_dpo_step.py)
    args: tuple = ()
    xla_flags: str = ""         # added to XLA_FLAGS for this process
    profile: bool = False
    essential: bool = False     # compiles at full priority and is not stopped at the compile deadline
    why: str = ""


# Timing order. The DPO rows compare with torch.compile at the same batch and precision; the SmPO and DRO
# rows carry their speed options (their step over DPO's of the same run is the figure); then the DPO levers.
VARIANTS = (
    Variant("jax-dpo", "jax", ("--objectives", "dpo"), profile=True, essential=True, why="the baseline: as trained"),
    Variant("torch-compile", "torch", ("--compile", "--no-eager"), profile=True, essential=True,
            why="PyTorch diffusers step under torch.compile, same batch and precision"),
    Variant("jax-smpo-chunks8", "jax", ("--objectives", "smpo", "--set", "smpo.inversion_chunks=8"),
            why="SmPO inverting only the rows each level needs, in 8 chunks"),
    Variant("jax-dro-spt4", "jax", ("--objectives", "dro", "--set", "dro.steps_per_trajectory=4"),
            why="DRO training 4 steps of each sampled trajectory"),
    Variant("jax-dpo-cudnn-cross", "jax", ("--objectives", "dpo", "--attention", "cudnn_padded"),
            why="the 77-key cross-attention on cuDNN too (keys padded to 128, masked) instead of XLA's fp32 dense"),
    Variant("jax-dpo-cublas-gemms", "jax", ("--objectives", "dpo"), xla_flags="--xla_gpu_enable_triton_gemm=false",
            why="every matmul by cuBLAS instead of XLA's Triton GEMM fusions"),
    Variant("jax-dpo-no-command-buffers", "jax", ("--objectives", "dpo"), xla_flags="--xla_gpu_enable_command_buffer=",
            why="kernels launched one by one instead of as CUDA graphs"),
    Variant("jax-dpo-b16", "jax", ("--objectives", "dpo", "--batch", "16"), why="16 pairs: larger kernels"),
)
BY_NAME = {v.name: v for v in VARIANTS}


def command(v: Variant, rank: int, count: int, args, share_dir: str) -> list:
    """The process of variant ``v`` at ``rank`` of a group of ``count``."""
    out = os.path.join(args.out, f"{v.name}.json")
    common = ["--size", args.size, "--json", out, "--share-device", f"{share_dir}:{count}:{rank}"]
    if args.iters:
        common += ["--iters", str(args.iters)]
    if v.profile:
        common += ["--profile", os.path.join(args.out, "profile", v.name)]
    batch = [] if "--batch" in v.args else ["--batch", str(args.batch)]
    # The others compile on the host cores the essential rows leave (their compiles take minutes each).
    nice = [] if v.essential else ["nice", "-n", "10"]
    if v.tool == "torch":
        return [*nice, sys.executable, os.path.join(HERE, "torch_dpo_step.py"), *common, *batch, *v.args]
    return [*nice, sys.executable, os.path.join(HERE, "bench.py"), "--no-isolate", "--attention", args.attention,
            *common, *batch, *v.args]


def environment(v: Variant) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               # Waiting processes hold no weights; each takes GPU memory as it needs it, in its turn.
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if v.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {v.xla_flags}".strip()
    return env


def run_group(variants, args) -> dict:
    """Starts every variant, enforces the deadlines, returns {name: exit status or a reason}."""
    share_dir = os.path.join(args.out, "turns")
    shutil.rmtree(share_dir, ignore_errors=True)
    os.makedirs(share_dir)
    marker = lambda what, rank: os.path.join(share_dir, f"{what}.{rank}")  # noqa: E731
    procs = {}
    for rank, v in enumerate(variants):
        log = open(os.path.join(args.out, f"{v.name}.log"), "w")
        cmd = command(v, rank, len(variants), args, share_dir)
        log.write(" ".join(cmd) + "\n")
        log.flush()
        procs[v.name] = (rank, subprocess.Popen(cmd, env=environment(v), stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True), log)
        print(f"started {v.name} (rank {rank}): {v.why}", flush=True)
    start, status = time.perf_counter(), {}

    def stop(name, reason):
        rank, proc, _ = procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        status[name] = reason

    try:
        _watch(procs, status, start, marker, stop, args)
    finally:  # stopped from outside (gpu_bench.sh's bound, ^C): no variant outlives the sweep
        for name in procs:
            if name not in status:
                stop(name, "the sweep was stopped")
        for _, _, log in procs.values():
            log.close()
    return status


def _watch(procs, status, start, marker, stop, args):
    while len(status) < len(procs):
        elapsed = time.perf_counter() - start
        for name, (rank, proc, _) in procs.items():
            if name in status:
                continue
            compiled = os.path.exists(marker("compiled", rank))
            if proc.poll() is not None:
                status[name] = proc.returncode
            elif elapsed > args.seconds:
                stop(name, f"stopped at the {args.seconds:.0f} s deadline")
            elif not compiled and elapsed > args.compile_deadline and not BY_NAME[name].essential:
                stop(name, f"still compiling at {args.compile_deadline:.0f} s")
            else:
                continue
            if not os.path.exists(marker("done", rank)):
                open(marker("failed", rank), "w").close()  # the others need not wait for it
            print(f"{name}: {status[name]} after {elapsed:.0f} s", flush=True)
        time.sleep(1.0)


def step_row(result: dict) -> Optional[dict]:
    """The step's row of a bench or torch JSON (the workload ending in "step")."""
    rows = [r for r in result.get("rows", []) if r["workload"].endswith(" step")]
    return rows[-1] if rows else None


def summarize(variants, args, status: dict) -> dict:
    """Each variant's step row beside the baseline's and torch.compile's."""
    results = {}
    for v in variants:
        path = os.path.join(args.out, f"{v.name}.json")
        result = json.load(open(path)) if os.path.exists(path) else {}
        results[v.name] = (result, step_row(result))
    base = results.get("jax-dpo", ({}, None))[1]
    torch_row = results.get("torch-compile", ({}, None))[1]
    table = []
    for v in variants:
        result, row = results[v.name]
        entry = {"variant": v.name, "why": v.why, "exit": status.get(v.name), "xla_flags": v.xla_flags,
                 "args": list(v.args)}
        if row:
            ms = row["seconds"] * 1e3
            entry.update(workload=row["workload"], pairs=row["pairs"], ms=ms, pairs_per_s=row["pairs_per_second"],
                         mfu=row.get("mfu_model"), peak_gib=None if row.get("peak_bytes") is None
                         else row["peak_bytes"] / 2**30, device=row.get("device"),
                         profile=(next(iter(result.get("objectives", {}).values()), {}).get("profile")
                                  or result.get("profiles", {}).get("torch compile")))
            per_pair = lambda r: r["seconds"] / r["pairs"]  # noqa: E731
            if torch_row and row["workload"] == "dpo step":
                entry["speedup_vs_torch_compile"] = per_pair(torch_row) / per_pair(row)
            if base:
                entry["step_over_jax_dpo"] = per_pair(row) / per_pair(base)
        table.append(entry)
    return {"size": args.size, "batch": args.batch, "attention": args.attention, "variants": table}


def format_summary(summary: dict) -> str:
    lines = [f"sweep: {summary['size']}, {summary['batch']} pairs unless named, attention {summary['attention']}",
             f"{'variant':<28} {'ms/step':>9} {'pairs/s':>8} {'MFU':>6} {'peak GiB':>8} {'x torch.compile':>15} "
             f"{'/ jax-dpo per pair':>18}  exit"]
    for e in summary["variants"]:
        f = lambda k, spec: "n/a" if e.get(k) is None else format(e[k], spec)  # noqa: E731
        mfu = "n/a" if e.get("mfu") is None else f"{100 * e['mfu']:.1f}%"
        lines.append(f"{e['variant']:<28} {f('ms', '.2f'):>9} {f('pairs_per_s', '.2f'):>8} {mfu:>6} "
                     f"{f('peak_gib', '.2f'):>8} {f('speedup_vs_torch_compile', '.3f'):>15} "
                     f"{f('step_over_jax_dpo', '.3f'):>18}  {e['exit']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="sd15")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step where a variant does not name it")
    parser.add_argument("--attention", default="cudnn", help="JAX's attention backend (CPU check: xla)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per row (default: the tools' 10; CPU 3)")
    parser.add_argument("--only", default=None, help="comma-separated variant names, in the table's order: "
                        + ", ".join(BY_NAME))
    parser.add_argument("--seconds", type=float, default=560.0, help="the whole run's bound")
    parser.add_argument("--compile-deadline", type=float, default=None,
                        help="stop a variant not compiled by then (default: 0.6 x --seconds)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; known: {', '.join(BY_NAME)}")
    variants = [BY_NAME[n] for n in BY_NAME if n in names]
    if args.compile_deadline is None:
        args.compile_deadline = 0.6 * args.seconds
    os.makedirs(args.out, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_group, which stops the variants
    status = run_group(variants, args)
    summary = summarize(variants, args, status)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
