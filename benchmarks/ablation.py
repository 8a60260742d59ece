"""Ablation of the methods' own mechanisms, and the baselines beside them, on the embedded world (tiny model,
shapes reward, CPU).

  python benchmarks/ablation.py        # every variant, seeds 0 1 2: 2-6 min per variant and seed on 2 cores
  python benchmarks/ablation.py --variants dro/sample,dpo --seeds 0 --steps 100 --set optimizer.lr=3e-4

Each variant is ``configs/tiny.py:<objective>`` with a few keys changed (``VARIANTS``) and one optimizer
for all (``BUDGET``: AdamW, constant lr 1e-4), trained by the same loop as ``python -m jaxpref.train``
for ``--steps`` updates per seed, evaluated on the held-out prompts every
``--eval-every`` updates (32 prompts x 4 images, the world's analytic reward). ``--set key=value``
changes the shared settings of every variant (the budget is the same for all of them). Writes
``--out`` (JSON: per variant and seed the reward curve, final gain over the base model, win rate and
steps/s; per variant mean ± std over seeds) and the plot beside it (held-out reward vs step, mean ± std
band per variant), and prints the table docs/results.md shows. ``--merge`` keeps the variants already in
``--out`` and adds or replaces only the ones run now (the settings must match); ``--from RUN.json`` takes
the variants' results from an earlier run's JSON instead of training them:

  python benchmarks/ablation.py --variants smpo/consistent+noisereg --out /tmp/new.json
  python benchmarks/ablation.py --variants smpo/consistent+noisereg --from /tmp/new.json --merge
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxpref import config_lib, train as train_lib  # noqa: E402
from jaxpref.models import load_pipeline, resolve_model_path  # noqa: E402

# variant -> config keys it changes on top of configs/tiny.py (and --set).
VARIANTS = {
    "dpo": {"objective": "dpo"},
    "smpo/none": {"objective": "smpo", "smpo.inversion": "none"},
    "smpo/code": {"objective": "smpo", "smpo.inversion": "code"},
    "smpo/paper": {"objective": "smpo", "smpo.inversion": "paper"},
    "smpo/consistent": {"objective": "smpo", "smpo.inversion": "consistent"},
    "smpo/consistent+noisereg": {"objective": "smpo", "smpo.inversion": "consistent",
                                 "smpo.inversion_noise_regularization": True},
    "smpo/consistent+noisereg-paper": {"objective": "smpo", "smpo.inversion": "consistent",
                                       "smpo.inversion_noise_regularization": True,
                                       "smpo.inversion_noise_shifts": "paper"},   # rolls 1..H/2: no variance pull
    "smpo/consistent+ddim": {"objective": "smpo", "smpo.inversion": "consistent", "smpo.inversion_iterations": 0,
                             "smpo.inversion_window": (0, 1)},   # plain DDIM inversion: K = 0 ReNoise iterations
    # a share of the pairs inverted, the others forward-noised as "none" trains them
    "smpo/consistent+mix0.5": {"objective": "smpo", "smpo.inversion": "consistent", "smpo.inversion_fraction": 0.5},
    "smpo/consistent+mix0.25": {"objective": "smpo", "smpo.inversion": "consistent", "smpo.inversion_fraction": 0.25},
    # inverted by the frozen reference: targets fixed per image instead of following the policy
    "smpo/consistent+refinv": {"objective": "smpo", "smpo.inversion": "consistent",
                               "smpo.inversion_model": "reference"},
    "dro/trajectory": {"objective": "dro", "dro.negative_target": "trajectory"},
    "dro/sample": {"objective": "dro", "dro.negative_target": "sample"},
    "dro/trajectory+stale": {"objective": "dro", "dro.negative_target": "trajectory", "dro.refresh_every": 10},
    "dro/sample+stale": {"objective": "dro", "dro.negative_target": "sample", "dro.refresh_every": 10},
    # each stored trajectory trained k steps (generation / k): dro.steps_per_trajectory
    "dro/sample+reuse2": {"objective": "dro", "dro.negative_target": "sample", "dro.steps_per_trajectory": 2},
    "dro/sample+reuse4": {"objective": "dro", "dro.negative_target": "sample", "dro.steps_per_trajectory": 4},
    # the baselines the papers compare against, on the same pairs and budget
    "sft": {"objective": "sft"},
    "kto": {"objective": "kto"},
    "mapo": {"objective": "mapo"},
    "mapo/lr1e-5": {"objective": "mapo", "optimizer.lr": 1e-5},   # the released code's learning rate
}
# The same optimizer for every variant (configs/tiny.py's DPO/SmPO setting; the demo's DRO is tuned apart).
BUDGET = {"optimizer.lr": 1e-4, "optimizer.schedule": "constant", "optimizer.warmup_steps": 10}
METRIC = "shapes/mean"


def variant_config(name: str, seed: int, steps: int, eval_every: int, shared: dict):
    changes = VARIANTS[name]
    c = config_lib.load_config(f"tiny:{changes['objective']}")
    config_lib.apply_overrides(c, {**BUDGET, **shared, **changes}, source=f"variant {name}:")
    c.seed, c.total_steps = seed, steps
    c.eval.every = eval_every
    c.checkpoint.update(every=0, keep=1, export_unet=False)
    return c


def eval_curve(workdir: str, base: float) -> list[tuple[int, float]]:
    """(step, held-out mean reward) from the run's metrics.jsonl, the base model as step 0."""
    curve = [(0, base)]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get(f"eval/{METRIC}") is not None:
                curve.append((row["step"], row[f"eval/{METRIC}"]))
    return sorted(dict(curve).items())


def run_one(name, seed, args, shared, pipeline, root) -> dict:
    config = variant_config(name, seed, args.steps, args.eval_every, shared)
    return measured_run(name, config, pipeline, root)


def measured_run(name, config, pipeline, root) -> dict:
    """Trains ``config`` (variant ``name``) in ``root``/<name>/seed<seed>: its gain, win rate, speed and curve."""
    workdir = os.path.join(root, name.replace("/", "_"), f"seed{config.seed}")
    start = time.perf_counter()
    summary = train_lib.train(config, workdir, pipeline=pipeline)
    base, trained = summary["base"][METRIC], summary["trained"][METRIC]
    out = {"seed": config.seed, "base": base, "trained": trained, "gain": trained - base,
           "win_rate": summary["trained"]["shapes/win_rate"], "steps_per_sec": summary["steps_per_sec"],
           "wall_seconds": time.perf_counter() - start, "curve": eval_curve(workdir, base)}
    print(f"{name} seed {config.seed}: gain {out['gain']:+.4f} win {out['win_rate']:.3f} "
          f"{out['steps_per_sec']:.2f} steps/s ({out['wall_seconds']:.0f} s)", flush=True)
    return out


def aggregate(runs: list[dict]) -> dict:
    stat = lambda k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
    (gain, gain_std), (win, win_std), (sps, _) = stat("gain"), stat("win_rate"), stat("steps_per_sec")
    return {"gain_mean": gain, "gain_std": gain_std, "win_rate_mean": win, "win_rate_std": win_std,
            "steps_per_sec": sps, "seeds": [r["seed"] for r in runs]}


def table(results: dict) -> str:
    lines = ["| variant | gain in held-out reward (mean ± std) | win rate | steps/s |", "| --- | --- | --- | --- |"]
    for name, v in results.items():
        a = v["summary"]
        lines.append(f"| {name} | {a['gain_mean']:+.4f} ± {a['gain_std']:.4f} | "
                     f"{a['win_rate_mean']:.3f} ± {a['win_rate_std']:.3f} | {a['steps_per_sec']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    if len(results) > 10:   # the default cycle repeats after 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, v in results.items():
        steps = [s for s, _ in v["runs"][0]["curve"]]
        values = np.array([[r for _, r in run["curve"]] for run in v["runs"]])
        mean, std = values.mean(0), values.std(0)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=name, ls="--" if name.startswith("dro") else "-")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("update")
    ax.set_ylabel(f"held-out {METRIC} reward")
    seeds = len(next(iter(results.values()))["runs"])
    ax.set_title(f"embedded world, tiny model: mean ± std over {seeds} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep_parser(doc: str, variants, out_name: str) -> argparse.ArgumentParser:
    """The arguments every sweep over ``variants`` on the embedded world takes (this file's and others')."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(variants), help=f"comma-separated, from {list(variants)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", out_name))
    p.add_argument("--workdir", default="", help="run folders (default: a temporary folder)")
    p.add_argument("--merge", action="store_true",
                   help="keep the variants already in --out; add or replace only those run now")
    return p


def chosen_variants(p: argparse.ArgumentParser, args, variants) -> list[str]:
    """--variants as a list; an unknown name ends the command before anything trains."""
    names = args.variants.split(",")
    unknown = [n for n in names if n not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; known {list(variants)}")
    return names


def main():
    p = sweep_parser(__doc__, VARIANTS, "ablation_tiny.json")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a configs/tiny.py key changed for every variant, e.g. optimizer.lr=3e-4")
    p.add_argument("--from", dest="source", default="", metavar="RUN.json",
                   help="take the variants' results from this earlier output instead of training them")
    args = p.parse_args()
    names = chosen_variants(p, args, VARIANTS)
    shared = config_lib.parse_overrides(args.set)
    config_lib.apply_overrides(config_lib.load_config("tiny"), shared)  # a typo fails here, before anything trains
    meta = run_meta(args, shared)
    kept = load_results(args.out, meta) if args.merge else {}   # a mismatch fails here, before anything trains
    if args.source:
        source = load_results(args.source, meta)
        missing = [n for n in names if n not in source]
        if missing:
            p.error(f"--from {args.source}: no results for variants {missing}; it has {list(source)}")
        results = {**kept, **{n: source[n] for n in names}}
        write(results, meta, args.out)
    else:
        pipeline = load_pipeline(resolve_model_path("embedded:tiny"))
        root = args.workdir or tempfile.mkdtemp(prefix="ablation_")
        results = dict(kept)
        for name in names:
            runs = [run_one(name, s, args, shared, pipeline, root) for s in args.seeds]
            results[name] = {"changes": VARIANTS[name], "runs": runs, "summary": aggregate(runs)}
            write(results, meta, args.out)
    print(table(results))


def device_name() -> str:
    """The device a sweep ran on, as its JSON names it: e.g. "cpu (x86_64, 2 cores)"."""
    return f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_meta(args, shared) -> dict:
    return {"device": device_name(), "steps": args.steps, "eval_every": args.eval_every,
            "seeds": args.seeds, "budget": BUDGET, "shared_changes": shared,
            "base_config": "configs/tiny.py:<objective>", "metric": METRIC}


def load_results(path: str, meta: dict) -> dict:
    """The variants of an earlier output, refused unless it was run with the same settings as ``meta``."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no ablation results to merge with or take from")
    with open(path) as f:
        saved = json.load(f)
    differ = {k: (saved["meta"].get(k), v) for k, v in meta.items() if saved["meta"].get(k) != v}
    if differ:
        raise SystemExit(f"{path}: run with other settings, not comparable ({{key: (saved, now)}}): {differ}")
    return saved["variants"]


def write(results: dict, meta: dict, out: str):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "variants": results}, f, indent=1)
    plot(results, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
