"""Evaluating the papers' way: a protocol (``jaxpref.protocols``) over its prompt sets with the base and the
tuned model side by side, and paired comparisons of two evaluations with bootstrap intervals (``jaxpref.stats``).

    python -m jaxpref.evaluate --protocol=dro --model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --checkpoint=/runs/dro --prompts=pickapic:/data/pickapic_test,hpdv2:/data/hpdv2 \\
        --reward=pickscore=yuvalkirstain/PickScore_v1,hpsv2=/models/HPS_v2_compressed.pt,... --out=/evals/dro
    python -m jaxpref.evaluate --compare=/evals/a,/evals/b --out=/evals/a_vs_b   # A against B
    python -m jaxpref.evaluate --compare=/runs/dro --out=/evals/dro_vs_base     # a run's trained vs base

A protocol writes, under --out: ``<set>/base/`` and ``<set>/tuned/`` (evaluation folders: images/,
grid.png, scores.npz, prompts.json, metrics.json, metrics.md), ``<set>/before_after.png``, protocol.json
(each setting with where it came from, the sources, per prompt set the mean and median of each scorer for
base and tuned, overall and per category, and the paired comparison tuned vs base) and protocol.md (the
papers' table). A comparison writes compare.json and compare.md. Without --checkpoint only the base model
is evaluated.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxpref import console, evaluate as ev, export, figures, protocols, prompts as prompts_lib, rewards, stats
from jaxpref.prompts import PromptSet

MODELS = ("base", "tuned")


def explicit_flags(f, names: Sequence[str]) -> dict:
    """{name: value} of the flags given on the command line (absl's ``present``)."""
    return {name: getattr(f, name) for name in names if f[name].present}


def folder_names(prompt_sets: Sequence[PromptSet]) -> list[str]:
    """One distinct file-system-safe folder name per prompt set ("shapes/test[:2]" -> "shapes_test_2")."""
    names = []
    for ps in prompt_sets:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", ps.name).strip("_") or "prompts"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Paired comparisons.

def comparison(scores_a: Mapping[str, np.ndarray], scores_b: Mapping[str, np.ndarray],
               categories: Optional[Sequence[str]] = None) -> dict:
    """{scorer: stats.paired_comparison(A, B) [+ "by_category": {cat: ...}]} for the scorers both have."""
    out = {}
    for name in (n for n in scores_a if n in scores_b):
        out[name] = stats.paired_comparison(scores_a[name], scores_b[name])
        if categories is not None and len(set(categories)) > 1:
            cats = np.asarray(categories)
            out[name]["by_category"] = {c: stats.paired_comparison(np.asarray(scores_a[name])[cats == c],
                                                                   np.asarray(scores_b[name])[cats == c])
                                        for c in dict.fromkeys(categories)}
    return out


def read_evaluation(folder: str) -> tuple[list, Optional[np.ndarray], dict]:
    """(prompts, seeds [N, K] or None, {scorer: [N, K]}) of an evaluation folder."""
    for name in ("scores.npz", "prompts.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{os.path.join(folder, name)}: missing; expected the --out folder of a "
                             "jaxpref.evaluate run")
    scores = ev.load_scores(folder)
    with np.load(os.path.join(folder, "scores.npz")) as data:
        seeds = data["__seeds__"] if "__seeds__" in data.files else None
    with open(os.path.join(folder, "prompts.json")) as f:
        return json.load(f), seeds, scores


def compare_evaluations(dir_a: str, dir_b: str) -> dict:
    """A against B, two evaluation folders of the same prompts and seeds (else a ValueError naming both)."""
    prompts_a, seeds_a, scores_a = read_evaluation(dir_a)
    prompts_b, seeds_b, scores_b = read_evaluation(dir_b)
    if prompts_a != prompts_b:
        where = next((i for i, (x, y) in enumerate(zip(prompts_a, prompts_b)) if x != y), min(len(prompts_a),
                                                                                             len(prompts_b)))
        raise ValueError(f"--compare: {dir_a} ({len(prompts_a)} prompts) and {dir_b} ({len(prompts_b)}) differ "
                         f"at prompt {where}; a paired comparison needs the same prompts in the same order")
    if seeds_a is not None and seeds_b is not None and not np.array_equal(seeds_a, seeds_b):
        raise ValueError(f"--compare: {dir_a} and {dir_b} used different seeds (--seed or --num_images_per_prompt "
                         "differ); a paired comparison needs the same seeds")
    common = [n for n in scores_a if n in scores_b]
    if not common:
        raise ValueError(f"--compare: {dir_a} scored {sorted(scores_a)}, {dir_b} {sorted(scores_b)}: no scorer in "
                         "common")
    return comparison({n: scores_a[n] for n in common}, scores_b)


def compare_pairs(spec: str) -> list[tuple[str, str, str]]:
    """(label, folder A, folder B) for ``--compare``: "A,B" (two evaluation folders), or one folder: a training
    workdir (eval_trained against eval_base) or a protocol's --out (each set's tuned against its base)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 2:
        return [(f"{parts[0]} vs {parts[1]}", parts[0], parts[1])]
    if len(parts) == 1:
        root = parts[0]
        if os.path.isdir(os.path.join(root, "eval_trained")) and os.path.isdir(os.path.join(root, "eval_base")):
            return [("trained vs base", os.path.join(root, "eval_trained"), os.path.join(root, "eval_base"))]
        report = os.path.join(root, "protocol.json")
        if os.path.isfile(report):
            with open(report) as f:
                sets = json.load(f)["prompt_sets"]
            pairs = [(f"{name}: tuned vs base", os.path.join(root, name, "tuned"), os.path.join(root, name, "base"))
                     for name in sets]
            if all(os.path.isdir(a) for _, a, _ in pairs):
                return pairs
    raise ValueError(f"--compare={spec!r}: expected RUN_A,RUN_B (two jaxpref.evaluate --out folders), a training "
                     "workdir with eval_base/ and eval_trained/, or a --protocol --out folder with a tuned model")


def run_compare(spec: str, out_dir: str) -> dict:
    """Compares each pair of ``compare_pairs(spec)``; writes compare.json and compare.md, prints the table."""
    results = {label: {"a": a, "b": b, "comparison": compare_evaluations(a, b)} for label, a, b in compare_pairs(spec)}
    text = "\n".join(comparison_markdown(label, r["comparison"]) for label, r in results.items())
    _write(out_dir, "compare", results, text)
    print(text, flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Protocols.

def run_protocol(f, fallback: Mapping[str, Any]) -> dict:
    """``--protocol``: base (and, with --checkpoint, tuned) on each prompt set, the papers' table. ``f``: the
    parsed flags; fallback: the settings a --config or the flag defaults give (``evaluate._resolve_flags``)."""
    protocol = protocols.get(f.protocol)
    explicit = explicit_flags(f, protocols.SETTINGS)
    if f.baseline:
        raise ValueError("--baseline: not with --protocol, which compares --checkpoint with the base model; "
                         "use --compare=RUN_A,RUN_B for two earlier evaluations")
    if not fallback.get("model_path"):
        raise ValueError(f"--protocol={protocol.name}: --model_path (the base model) is required")
    # Everything that can fail on a path or a flag fails before any generation.
    first, _ = protocols.resolve(protocol, explicit, fallback, is_sdxl=False)
    # --prompts as _resolve_flags read it (a run's data:SPLIT and dir-less tfds: specs from its data_dir).
    specs = protocols.prompt_specs(protocol, explicit.get("prompts") and fallback["prompts"])
    prompt_sets = [prompts_lib.load_prompts(spec, first["num_prompts"] or None) for spec in specs]
    reward_spec = protocols.reward_spec(protocol, explicit.get("reward"))
    scorers = rewards.load_scorers(reward_spec, batch_size=f.score_batch_size)
    checkpoint, model_path = export.local_model_args(f.checkpoint, fallback["model_path"])
    if checkpoint:
        export.checkpoint_kind(checkpoint)
    folders = folder_names(prompt_sets)
    settings = sources = None
    for label, ckpt in [("base", None)] + ([("tuned", checkpoint)] if checkpoint else []):
        pipe, unet_params = export.load_trained(ckpt, model_path, use_ema=f.use_ema)
        if settings is None:
            settings, sources = protocols.resolve(protocol, explicit, fallback, is_sdxl=pipe.is_sdxl)
            settings["resolution"] = _image_side(pipe, settings["resolution"])
        for folder, ps in zip(folders, prompt_sets):
            with console.phase(f"{protocol.name}: {label} model on {ps.name}, {len(ps)} prompts x "
                               f"{settings['num_images_per_prompt']} images"):
                ev.evaluate(pipe, ps, scorers, unet_params=unet_params, out_dir=os.path.join(f.out, folder, label),
                            **_generate_kwargs(settings))
        del pipe, unet_params  # one model in memory at a time
    settings.update(prompts=specs, reward=reward_spec)
    sources.update(prompts="flag", reward="flag" if "reward" in explicit else "protocol")
    report = protocol_report(protocol, settings, sources, f.out, folders, prompt_sets, model_path, checkpoint)
    text = protocol_markdown(report)
    _write(f.out, "protocol", report, text)
    print(text, flush=True)
    return report


def _image_side(pipe, resolution: int) -> int:
    """The generated images' side in pixels: ``resolution``, or the model's native size for 0."""
    factor = 2 ** (len(pipe.vae.block_out_channels) - 1)
    return ev.latent_shape(pipe, resolution or None, resolution or None)[0] * factor


def _generate_kwargs(settings: Mapping[str, Any]) -> dict:
    kw = {k: settings[k] for k in ("sampler", "num_steps", "guidance_scale", "num_images_per_prompt", "seed",
                                   "batch_size")}
    return {**kw, "height": settings["resolution"], "width": settings["resolution"]}


def protocol_report(protocol: protocols.Protocol, settings: dict, sources: dict, out_dir: str,
                    folders: Sequence[str], prompt_sets: Sequence[PromptSet], model_path: str,
                    checkpoint: Optional[str]) -> dict:
    """protocol.json's content, from the evaluation folders the run wrote (also the before/after grids);
    the tuned model's folders are read when there is a ``checkpoint``."""
    sets = {}
    for folder, ps, spec in zip(folders, prompt_sets, settings["prompts"]):
        categories = list(ps.categories)
        dirs = {m: os.path.join(out_dir, folder, m) for m in (MODELS if checkpoint else MODELS[:1])}
        scores = {m: read_evaluation(d)[2] for m, d in dirs.items()}
        entry = {"name": ps.name, "kind": prompts_lib.parse_spec(spec)[0], "num_prompts": len(ps),
                 **{m: ev.summarize(s, categories) for m, s in scores.items()}}
        if "tuned" in scores:
            entry["comparison"] = comparison(scores["tuned"], scores["base"], categories)
            entry["before_after"] = figures.before_after(dirs["base"], dirs["tuned"],
                                                         os.path.join(out_dir, folder, "before_after.png"))
        sets[folder] = entry
    return {"protocol": protocol.name, "paper": protocol.paper, "sources": list(protocol.sources),
            "scorer_versions": dict(protocol.scorer_versions), "seed_rule": protocols.SEED_RULE,
            "settings": settings, "setting_sources": sources, "model_path": model_path, "checkpoint": checkpoint,
            "prompt_sets": sets}


# ---------------------------------------------------------------------------------------------
# Tables.

def _interval(c: Mapping[str, Any], key: str, signed: bool) -> str:
    fmt = "{:+.4f}" if signed else "{:.3f}"
    low, high = c[f"{key}_ci"]
    return f"{fmt.format(c[key])} [{fmt.format(low)}, {fmt.format(high)}]"


def _rows(label: str, summaries: Mapping[str, Mapping], comp: Optional[Mapping]) -> str:
    cells = [f"{s['mean']:.4f} | {s['median']:.4f}" for s in summaries.values()]
    if comp is not None:
        cells += [_interval(comp, "mean_diff", True), _interval(comp, "win_rate", False)]
    return f"| {label} | " + " | ".join(cells) + " |"


def protocol_markdown(report: Mapping[str, Any]) -> str:
    """The papers' table per prompt set: mean and median of each scorer, base and tuned side by side, the
    difference and the win rate with their 95 % intervals; one row per category for HPDv2's styles."""
    s, src = report["settings"], report["setting_sources"]
    flagged = sorted(k for k, v in src.items() if v == "flag" and k not in ("prompts", "reward"))
    lines = [f"# Protocol {report['protocol']}: {report['paper']}", "",
             f"{s['sampler'].upper()} {s['num_steps']} steps, CFG {s['guidance_scale']:g}, "
             f"{s['num_images_per_prompt']} image(s) per prompt, {s['resolution']} px, seed {s['seed']} "
             f"({report['seed_rule']})" + (f"; set by flags: {', '.join(flagged)}" if flagged else "") + ".",
             f"Base: {report['model_path']}" + (f"; tuned: {report['checkpoint']}" if report["checkpoint"] else "")
             + ". Intervals: 95 % bootstrap over prompts; win rate per prompt, ties count half."]
    for folder, entry in report["prompt_sets"].items():
        models = [m for m in MODELS if m in entry]
        head = "".join(f" {m} mean | {m} median |" for m in models)
        rule = "---:|---:|" * len(models)
        if "comparison" in entry:
            head, rule = head + " tuned - base [95% CI] | win rate [95% CI] |", rule + "---:|---:|"
        lines += ["", f"## {entry['name']} ({entry['num_prompts']} prompts)", "", f"| scorer |{head}", f"|---|{rule}"]
        comp = entry.get("comparison", {})
        for name in entry["base"]:
            lines.append(_rows(name, {m: entry[m][name] for m in models}, comp.get(name)))
            if entry["kind"] == "hpdv2":
                for cat in entry["base"][name].get("by_category", {}):
                    lines.append(_rows(f"{name} / {cat}", {m: entry[m][name]["by_category"][cat] for m in models},
                                       comp[name]["by_category"][cat] if name in comp else None))
    return "\n".join(lines) + "\n"


def comparison_markdown(label: str, comp: Mapping[str, Mapping]) -> str:
    """One comparison's table: per scorer the two means, A - B and A's win rate with their 95 % intervals."""
    n = next(iter(comp.values()))["n_prompts"]
    lines = [f"## {label} ({n} prompts)", "", "| scorer | A mean | B mean | A - B [95% CI] | win rate of A [95% CI] |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {c['mean_a']:.4f} | {c['mean_b']:.4f} | {_interval(c, 'mean_diff', True)} | "
              f"{_interval(c, 'win_rate', False)} |" for name, c in comp.items()]
    return "\n".join(lines) + "\n"


def _write(out_dir: str, stem: str, report: Mapping, text: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write(text)
