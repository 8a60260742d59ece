"""Generate for a prompt set with the papers' protocol, score with reward models, report (docs/methods.md §5).

    python -m jaxpref.evaluate --model_path=/models/sd15 --checkpoint=/runs/dro \\
        --prompts=parti:/data/PartiPrompts.tsv --reward=pickscore=/ckpt/PickScore_v1,hpsv2=/ckpt/hps \\
        --out=/evals/dro_parti --num_images_per_prompt=5 --sampler=ddpm --num_steps=50 --guidance_scale=7.5
    # win rate against an earlier evaluation (same prompts, same seeds):
    python -m jaxpref.evaluate ... --out=/evals/dro_parti --baseline=/evals/sd15_parti

Protocol (Diffusion-DRO's): image k of prompt i starts from x_T drawn with seed ``seed + i + k * n_prompts``
(and, for DDPM, its per-step noise from the same seed), so every image is a pure function of (model,
prompt, seed): results do not depend on the batch size or on the number of devices (up to float
summation order: measured 5e-5 on latents between batch sizes). Batches are split over all devices
on the batch axes of the training mesh (``jaxpref.sharding.make_mesh``), the generator running per
device inside ``shard_map`` (each image is independent). Classifier-free guidance uses the empty prompt (or
``negative_prompt``) as the unconditional input, as diffusers' pipelines do; SDXL (``force_zeros_for_empty_prompt``)
uses zeros instead of the encoded empty prompt and time ids (H, W, 0, 0, H, W), as StableDiffusionXLPipeline.

Outputs in ``--out``: images/<prompt>_<k>.png, grid.png, scores.npz (per image, [n_prompts, k] per reward),
metrics.json and metrics.md (mean / median / std per reward, per category when the set has them, and
per-prompt win rates against --baseline, with 95 % bootstrap intervals). ``--protocol=dro|smpo|dpo|kto|mapo``
evaluates a paper's way (``jaxpref.protocols``: base and --checkpoint side by side on its prompt sets), and
``--compare=RUN_A,RUN_B`` compares two earlier evaluations (``jaxpref.paper_eval``). Python API:
``generate``, ``score``, ``summarize``, ``compare``, ``evaluate`` (what the train loop calls; returns a flat
dict of floats), ``log_to_tensorboard``.
"""
from __future__ import annotations

if __name__ == "__main__":
    from jaxpref import console as _console
    _console.quiet_native_logs()   # before jax loads: XLA's C++ log reads its level once

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, PartitionSpec as P
from ml_collections import config_flags
from PIL import Image

from jaxpref import (console, diffusion, export, fileio, figures, hub, prompts as prompts_lib, protocols, rewards,
                     run_config, sharding)
from jaxpref.data.tokenizer import tokenize
from jaxpref.models import attention, conditioning, pipeline as pipeline_lib
from jaxpref.prompts import PromptSet
from jaxpref.rewards.scorer import Scorer, as_prompts
from jaxpref.stats import paired_comparison

PipelineLike = Union[pipeline_lib.SDPipeline, str]
PromptsLike = Union[PromptSet, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` made. images uint8 [N, K, H, W, 3]; latents float32 [N, K, h, w, c] (the sampler's
    output, before the VAE); seeds int64 [N, K]; seconds: wall time of sampling + decoding (including the
    compilation of the first call for a new model/settings/batch shape)."""
    images: np.ndarray
    latents: np.ndarray
    seeds: np.ndarray
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images.shape[0] * self.images.shape[1] / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# Seeds and noise (pure functions of the seed).

def image_seeds(num_prompts: int, num_images_per_prompt: int, seed: int) -> np.ndarray:
    """[N, K] int64: seed + i + k * N for image k of prompt i (DRO's evaluation protocol)."""
    i = np.arange(num_prompts, dtype=np.int64)[:, None]
    k = np.arange(num_images_per_prompt, dtype=np.int64)[None, :]
    return seed + i + k * num_prompts


def _keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))


def initial_noise(seeds, latent_shape: tuple) -> jax.Array:
    """x_T [B, h, w, c] float32: N(0, 1) from fold_in(key(seed), 0), one seed per image."""
    keys = _keys(jnp.asarray(seeds))
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape, jnp.float32))(keys)


def sampler_rngs(seeds) -> jax.Array:
    """The per-image key DDPM (or DDIM with eta > 0) draws its step noise from: fold_in(key(seed), 1)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(_keys(jnp.asarray(seeds)))


# ---------------------------------------------------------------------------------------------
# The compiled pieces (one program per model/settings; params are arguments).

def latent_shape(pipe: pipeline_lib.SDPipeline, height: Optional[int], width: Optional[int]) -> tuple:
    """(h, w, c) of the latents for an image size; default: the UNet's sample_size, as diffusers."""
    factor = 2 ** (len(pipe.vae.block_out_channels) - 1)
    default = (pipe.unet.sample_size or 64) * factor
    height, width = height or default, width or default
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
    return (height // factor, width // factor, pipe.unet.in_channels)


@functools.lru_cache(maxsize=16)
def _text_encoder_fn(text_encoder):
    return jax.jit(lambda params, ids: text_encoder.apply({"params": params}, ids))


def encode_prompts(pipe: pipeline_lib.SDPipeline, prompts: Sequence[str], batch_size: int = 64):
    """prompts -> text embeddings [B, L, D] float32 (last hidden state; what SD1.x/2.x condition on), or for
    SDXL the dict {context [B, L, D1 + D2], text_embeds [B, P]} (``jaxpref.models.conditioning``)."""
    ids = tokenize(pipe.tokenizer, prompts)
    run = _text_encoder_fn(pipe.text_encoder)
    out = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        emb = run(pipe.text_encoder_params, padded)
        out.append(jax.tree_util.tree_map(lambda e: np.asarray(e, np.float32)[:len(chunk)], emb))
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *out)


def prompt_conditioning(pipe: pipeline_lib.SDPipeline, prompts: Sequence[str], negative_prompt: str,
                        image_size: tuple) -> tuple:
    """(cond for each prompt [N, ...], uncond for one image [...]) as numpy pytrees, diffusers' way: SDXL adds
    time ids (H, W, 0, 0, H, W) and, with force_zeros_for_empty_prompt and no negative prompt, zeros as uncond."""
    cond = encode_prompts(pipe, prompts)
    if not pipe.is_sdxl:
        return cond, encode_prompts(pipe, [negative_prompt])[0]
    ids = conditioning.time_ids(image_size, (0, 0), image_size)
    cond = {**cond, "time_ids": np.broadcast_to(ids, (len(prompts), 6))}
    if negative_prompt == "" and pipe.text_encoder.force_zeros_for_empty_prompt:
        uncond = {k: np.zeros_like(v[0]) for k, v in cond.items() if k != "time_ids"}
    else:
        uncond = jax.tree_util.tree_map(lambda e: e[0], encode_prompts(pipe, [negative_prompt]))
    return cond, {**uncond, "time_ids": ids}


def to_uint8(images: jax.Array) -> jax.Array:
    """VAE output in [-1, 1] -> uint8 as diffusers' numpy/PIL conversion: round(255 · clip(x/2 + 0.5, 0, 1))."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.lru_cache(maxsize=16)
def _generate_fn(unet, vae, schedule, sampler: str, num_steps: int, guidance_scale: float, eta: float,
                 shape: tuple, mesh: Mesh):
    """jit(unet_params, vae_params, seeds [B], cond [B, L, D], uncond [B, L, D]) -> (latents [B, h, w, c],
    uint8 images [B, H, W, 3]); cond and uncond may be SDXL's conditioning pytrees (leaves [B, ...]).

    ``sample`` is vmapped over images so each one draws its noise from its own seed (a batch-of-one
    trajectory per image); XLA batches the vmapped UNet as one [2B, ...] call per step. The whole generator
    runs per device inside ``shard_map`` over the mesh's batch axes (params replicated, B split): every
    image is independent, and a kernel XLA cannot partition (``pallas_tpu`` attention) then sees the
    device's own images instead of being replicated over the whole batch on every device.
    """
    def one(unet_params, x_T, rng, cond, uncond):
        eps_fn = lambda x, t, c: conditioning.apply_unet(unet, unet_params, x, t, c)
        one_row = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)
        return diffusion.sample(eps_fn, x_T[None], schedule, sampler=sampler, num_steps=num_steps,
                                guidance_scale=guidance_scale, rng=rng, cond=one_row(cond), uncond=one_row(uncond),
                                eta=eta)[0]

    def run(unet_params, vae_params, seeds, cond, uncond):
        x_T = initial_noise(seeds, shape)
        latents = jax.vmap(one, in_axes=(None, 0, 0, 0, 0))(unet_params, x_T, sampler_rngs(seeds), cond, uncond)
        decoded = vae.apply({"params": vae_params}, latents / vae.scaling_factor, method="decode")
        return latents, to_uint8(decoded)

    def run_per_device(*args):
        with attention.per_device(mesh):
            return run(*args)

    rows = P(sharding.BATCH_AXES)
    return jax.jit(jax.shard_map(run_per_device, mesh=mesh, in_specs=(P(), P(), rows, rows, rows),
                                 out_specs=(rows, rows), check_vma=False))


def decode_latents(pipe: pipeline_lib.SDPipeline, latents) -> np.ndarray:
    """latents [B, h, w, c] -> float32 images [B, H, W, 3] in [0, 1] (diffusers' output_type="np")."""
    return np.asarray(_decode_to_unit(pipe.vae, pipe.vae_params, jnp.asarray(latents)), np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode_to_unit(vae, vae_params, latents):
    decoded = vae.apply({"params": vae_params}, latents / vae.scaling_factor, method="decode")
    return jnp.clip(decoded / 2 + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Devices.

def _on_mesh(tree, sharding_):
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding_), tree)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Public API.

def _as_pipeline(pipeline_or_parts: PipelineLike) -> pipeline_lib.SDPipeline:
    if isinstance(pipeline_or_parts, pipeline_lib.SDPipeline):
        return pipeline_or_parts
    return pipeline_lib.load_pipeline(hub.resolve(os.fspath(pipeline_or_parts), key="pipeline"))


def _prompt_list(prompts: PromptsLike) -> list[str]:
    items = list(prompts.prompts) if isinstance(prompts, PromptSet) else as_prompts(prompts)
    if not items:
        raise ValueError("generate: no prompts")
    return items


def generate(pipeline_or_parts: PipelineLike, prompts: PromptsLike, *, unet_params=None,
             num_images_per_prompt: int = 1, sampler: str = "ddpm", num_steps: int = 50,
             guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 8, height: Optional[int] = None,
             width: Optional[int] = None, negative_prompt: str = "", eta: float = 0.0, devices=None,
             mesh: Optional[Mesh] = None, progress: Optional[Callable[[int, int], None]] = None) -> Generation:
    """K images for each of N prompts, image k of prompt i from seed ``seed + i + k·N`` (module docstring).

    pipeline_or_parts: an ``SDPipeline`` or a diffusers folder; unet_params replace its UNet params (the
    policy being trained or evaluated). batch_size: images per compiled call, rounded up to a multiple
    of the device count (the last batch is padded, so one program serves the whole run); devices: where
    to generate (default all), the batch split across them; mesh: a training mesh (``sharding.make_mesh``)
    to generate on instead, the batch split over its batch axes. progress(done, total): called as batches
    finish.
    Returns ``Generation`` (images uint8 [N, K, H, W, 3], latents, seeds, seconds).
    """
    pipe = _as_pipeline(pipeline_or_parts)
    texts = _prompt_list(prompts)
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt}; expected >= 1")
    schedule = diffusion.NoiseSchedule.from_config(pipe.scheduler_config)
    shape = latent_shape(pipe, height, width)
    mesh = sharding.make_mesh(-1, 1, devices) if mesh is None else mesh
    batch = _round_up(max(1, batch_size), mesh.size)
    rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    run = _generate_fn(pipe.unet, pipe.vae, schedule, sampler, int(num_steps), float(guidance_scale), float(eta), shape,
                       mesh)

    n, k = len(texts), num_images_per_prompt
    seeds = image_seeds(n, k, seed)                      # [N, K]
    flat_seeds = seeds.T.reshape(-1)                     # job j = k·N + i, seed + j
    flat_prompt = np.tile(np.arange(n), k)
    factor = 2 ** (len(pipe.vae.block_out_channels) - 1)
    cond_table, uncond = prompt_conditioning(pipe, texts, negative_prompt, (shape[0] * factor, shape[1] * factor))
    params = _on_mesh((pipe.unet_params if unet_params is None else unet_params, pipe.vae_params), replicated)
    uncond_batch = jax.device_put(jax.tree_util.tree_map(lambda u: np.broadcast_to(u, (batch, *u.shape)), uncond),
                                  rows)

    latents, images, pending = [], [], None

    def collect(done):  # host copies of a finished batch, padding dropped
        (out_latents, out_images), keep = done
        latents.append(np.asarray(out_latents)[:keep])
        images.append(np.asarray(out_images)[:keep])

    start = time.perf_counter()
    for s in range(0, len(flat_seeds), batch):
        idx = np.arange(s, min(s + batch, len(flat_seeds)))
        keep = len(idx)
        idx = np.concatenate([idx, np.full(batch - keep, idx[-1])])  # pad: repeat the last job
        out = run(params[0], params[1], jax.device_put(flat_seeds[idx], rows),
                  jax.device_put(jax.tree_util.tree_map(lambda c: c[flat_prompt[idx]], cond_table), rows),
                  uncond_batch)
        if pending is not None:  # copy the previous batch while this one runs (async dispatch)
            collect(pending)
            if progress is not None:
                progress(s, len(flat_seeds))
        pending = (out, keep)
    collect(pending)
    if progress is not None:
        progress(len(flat_seeds), len(flat_seeds))
    seconds = time.perf_counter() - start
    to_grid = lambda a: np.concatenate(a).reshape(k, n, *a[0].shape[1:]).swapaxes(0, 1)  # -> [N, K, ...]
    return Generation(to_grid(images), to_grid(latents).astype(np.float32), seeds, seconds)


def score(images: np.ndarray, prompts: PromptsLike, scorers: Mapping[str, Scorer]) -> dict[str, np.ndarray]:
    """images uint8 [N, K, H, W, 3] (or [N, H, W, 3]), N prompts -> {reward: scores float32 [N, K]}."""
    texts = _prompt_list(prompts)
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, None]
    n, k = images.shape[:2]
    if n != len(texts):
        raise ValueError(f"score: {n} prompts' images but {len(texts)} prompts")
    flat, flat_texts = images.reshape(n * k, *images.shape[2:]), [t for t in texts for _ in range(k)]
    return {name: np.asarray(s(flat, flat_texts), np.float32).reshape(n, k) for name, s in scorers.items()}


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64).reshape(-1)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std()), "n": int(x.size)}


def summarize(scores: Mapping[str, np.ndarray], categories: Optional[Sequence[str]] = None) -> dict:
    """{reward: {"mean", "median", "std", "n", ["by_category": {cat: stats}]}} over all images."""
    out = {}
    for name, s in scores.items():
        out[name] = _stats(s)
        if categories is not None and len(set(categories)) > 1:
            cats = np.asarray(categories)
            out[name]["by_category"] = {c: _stats(np.asarray(s)[cats == c]) for c in dict.fromkeys(categories)}
    return out


def compare(scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """Per-prompt win rate of A over B: each prompt's mean score over its K images, win 1, tie 1/2, loss 0;
    with the mean difference A - B and 95 % bootstrap intervals over prompts of both (``jaxpref.stats``).

    scores_*: [N] or [N, K] for the same N prompts in the same order.
    """
    return paired_comparison(scores_a, scores_b)


def flat_metrics(summary: Mapping[str, Any], win_rates: Optional[Mapping[str, dict]] = None) -> dict[str, float]:
    """{"pickscore/mean": ..., "pickscore/win_rate": ..., "pickscore/mean_diff_ci_low": ...}: the dict a train
    loop logs (the intervals' ends when ``win_rates`` came from ``compare``)."""
    out = {}
    for name, stats in summary.items():
        out.update({f"{name}/{key}": float(stats[key]) for key in ("mean", "median", "std")})
        for cat, cstats in stats.get("by_category", {}).items():
            out[f"{name}/{cat}/mean"] = float(cstats["mean"])
    for name, w in (win_rates or {}).items():
        out[f"{name}/win_rate"] = float(w["win_rate"])
        if "mean_diff_ci" in w:  # compare()'s bootstrap intervals
            out[f"{name}/mean_diff"] = float(w["mean_diff"])
            for key in ("mean_diff", "win_rate"):
                out[f"{name}/{key}_ci_low"], out[f"{name}/{key}_ci_high"] = map(float, w[f"{key}_ci"])
    return out


def markdown_table(summary: Mapping[str, Any], win_rates: Optional[Mapping[str, dict]] = None) -> str:
    """The metrics as Markdown: one row per reward (then one per reward and category); against a baseline
    also the difference of means and the win rate, each with its 95 % interval when ``compare`` gave one."""
    versus = " vs baseline [95% CI] | win rate vs baseline |"
    head = "| reward | mean | median | std | n |" + (versus if win_rates else "")
    rule = "|---|---:|---:|---:|---:|" + ("---:|---:|" if win_rates else "")
    lines = [head, rule]
    for name, s in summary.items():
        row = f"| {name} | {s['mean']:.4f} | {s['median']:.4f} | {s['std']:.4f} | {s['n']} |"
        if win_rates:
            row += _versus_cells(win_rates[name]) if name in win_rates else " | |"
        lines.append(row)
    cats = [(name, c, cs) for name, s in summary.items() for c, cs in s.get("by_category", {}).items()]
    if cats:
        lines += ["", "| reward | category | mean | median | std | n |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {c} | {cs['mean']:.4f} | {cs['median']:.4f} | {cs['std']:.4f} | {cs['n']} |"
                  for name, c, cs in cats]
    return "\n".join(lines) + "\n"


def _versus_cells(w: Mapping[str, Any]) -> str:
    """" +0.0570 [+0.0410, +0.0720] | 0.780 [0.66, 0.89] |" (the intervals only when ``w`` has them)."""
    if "mean_diff_ci" not in w:
        return f" | {w['win_rate']:.3f} |"
    (dl, dh), (wl, wh) = w["mean_diff_ci"], w["win_rate_ci"]
    return f" {w['mean_diff']:+.4f} [{dl:+.4f}, {dh:+.4f}] | {w['win_rate']:.3f} [{wl:.2f}, {wh:.2f}] |"


def make_grid(images: np.ndarray, max_prompts: int = 16) -> np.ndarray:
    """uint8 [N, K, H, W, 3] -> one uint8 image [rows·H, K·W, 3]: a row per prompt (first max_prompts)."""
    rows = images[:max_prompts]
    n, k, h, w, c = rows.shape
    return rows.transpose(0, 2, 1, 3, 4).reshape(n * h, k * w, c)


def save_images(out_dir: str, images: np.ndarray, max_grid_prompts: int = 16) -> None:
    """images/<i:05d>_<k:02d>.png for every image, and grid.png."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for i in range(images.shape[0]):
        for k in range(images.shape[1]):
            Image.fromarray(images[i, k]).save(os.path.join(out_dir, "images", f"{i:05d}_{k:02d}.png"))
    Image.fromarray(make_grid(images, max_grid_prompts)).save(os.path.join(out_dir, "grid.png"))


def load_scores(eval_dir: str) -> dict[str, np.ndarray]:
    """{reward: [N, K]} from an earlier evaluation's scores.npz (for --baseline)."""
    path = os.path.join(eval_dir, "scores.npz")
    if not fileio.isfile(path):
        raise ValueError(f"{path}: missing; --baseline must be the --out folder of an earlier jaxpref.evaluate run")
    with fileio.open_file(path, "rb") as f, np.load(f) as data:
        return {k: data[k] for k in data.files if k != "__seeds__"}


def evaluate(pipeline_or_parts: PipelineLike, prompts: PromptsLike, scorers: Mapping[str, Scorer], *,
             unet_params=None, out_dir: Optional[str] = None,
             baseline_scores: Optional[Mapping[str, np.ndarray]] = None, save_pngs: bool = True,
             mesh: Optional[Mesh] = None, **generate_kwargs) -> dict[str, float]:
    """Generate, score, summarize; write the report to ``out_dir`` (if given); return flat float metrics.

    generate_kwargs: ``generate``'s settings (num_images_per_prompt, sampler, num_steps, guidance_scale,
    seed, batch_size, ...). baseline_scores: {reward: [N, K]} of another model on the same prompts
    (e.g. ``load_scores(dir)``); adds "<reward>/win_rate". The train loop logs the returned dict.
    """
    prompt_set = prompts if isinstance(prompts, PromptSet) else None
    texts = _prompt_list(prompts)
    progress = generate_kwargs.pop("progress", None)
    gen = generate(pipeline_or_parts, texts, unet_params=unet_params, mesh=mesh, progress=progress,
                   **generate_kwargs)
    start = time.perf_counter()
    scores = score(gen.images, texts, scorers)
    score_seconds = time.perf_counter() - start
    categories = list(prompt_set.categories) if prompt_set is not None else None
    summary = summarize(scores, categories)
    win_rates = {name: compare(scores[name], baseline_scores[name])
                 for name in scores if baseline_scores is not None and name in baseline_scores}
    metrics = flat_metrics(summary, win_rates)
    n_images = gen.images.shape[0] * gen.images.shape[1]
    metrics["generate/images_per_s"] = gen.images_per_second
    metrics["score/images_per_s"] = n_images * len(scorers) / max(score_seconds, 1e-9) if scorers else 0.0
    if out_dir:
        write_report(out_dir, gen, texts, scores, summary, win_rates, metrics, generate_kwargs, save_pngs)
    return metrics


def write_report(out_dir: str, gen: Generation, prompts: Sequence[str], scores: Mapping[str, np.ndarray],
                 summary: Mapping, win_rates: Mapping, metrics: Mapping, settings: Mapping, save_pngs: bool = True):
    """scores.npz, metrics.json, metrics.md, prompts.json, images/ and grid.png under out_dir."""
    with fileio.staged(out_dir) as local:   # a bucket out_dir: written here, then copied up
        _write_report(local, gen, prompts, scores, summary, win_rates, metrics, settings, save_pngs)


def _write_report(out_dir, gen, prompts, scores, summary, win_rates, metrics, settings, save_pngs):
    os.makedirs(out_dir, exist_ok=True)
    if save_pngs:
        save_images(out_dir, gen.images)
    np.savez(os.path.join(out_dir, "scores.npz"), __seeds__=gen.seeds, **scores)
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump(list(prompts), f, indent=0)
    report = {"summary": summary, "win_rates": win_rates, "metrics": metrics,
              "settings": {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))},
              "num_prompts": gen.images.shape[0], "num_images_per_prompt": gen.images.shape[1]}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
        f.write(markdown_table(summary, win_rates))


def log_to_tensorboard(writer, metrics: Mapping[str, float], step: int, prefix: str = "eval/") -> None:
    """Writes flat metrics with any common writer: tensorboardX/torch ``add_scalar``, clu ``write_scalars``,
    flax's ``scalar``."""
    tagged = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
    if hasattr(writer, "write_scalars"):
        writer.write_scalars(step, tagged)
        return
    add = getattr(writer, "add_scalar", None) or getattr(writer, "scalar", None)
    if add is None:
        raise ValueError(f"log_to_tensorboard: {type(writer).__name__} has no add_scalar / scalar / write_scalars")
    for tag, value in tagged.items():
        add(tag, value, step)



# ---------------------------------------------------------------------------------------------
# A training run's evaluations (what ``jaxpref.train`` calls; ``run`` is a ``jaxpref.trainer.Run``).

def evaluate_run(run, unet_params, out_dir, baseline=None, mesh=None, label: str = "the policy") -> dict:
    """The run's held-out evaluation (config.eval) of ``unet_params`` on the training ``mesh``, announced on
    the console with its progress and duration; {} across several processes (generation gathers to one
    host's devices; not done across hosts yet)."""
    cfg = run.config.eval
    if jax.process_count() > 1:
        return {}
    prompts = prompts_lib.load_prompts(cfg.prompts, limit=cfg.num_prompts)
    scorers = rewards.load_scorers(cfg.rewards)
    what = (f"evaluating {label}: {len(prompts)} prompts x {cfg.images_per_prompt} images "
            f"({cfg.sampler.upper()} {cfg.num_steps}, CFG {cfg.guidance_scale:g})")
    with console.phase(what):
        return evaluate(run.pipeline, prompts, scorers, unet_params=sharding.host_params(unet_params),
                        out_dir=out_dir, baseline_scores=baseline, num_images_per_prompt=cfg.images_per_prompt,
                        sampler=cfg.sampler, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                        seed=run.config.seed, batch_size=cfg.batch_size, mesh=mesh, progress=_ProgressLine())


class _ProgressLine:
    """'  64/128 images' as generation batches finish, at most one line every 10 s (and the last)."""

    def __init__(self, every_seconds: float = 10.0):
        self.every, self.last = every_seconds, time.perf_counter()

    def __call__(self, done: int, total: int):
        now = time.perf_counter()
        if done >= total or now - self.last >= self.every:
            self.last = now
            console.say(f"  {done}/{total} images")


_BASE_EVALS: dict = {"model": None, "runs": {}}  # the last pipeline's base evaluations in this process


def evaluate_base(run, out_dir, mesh=None) -> dict:
    """The base model's evaluation; runs in the same process on the same pipeline object (same params
    objects) with the same eval settings and seed (a sweep over objectives or lrs) copy the first one's
    folder instead of generating the images again."""
    model = (run.pipeline, run.pipeline.unet_params)
    if _BASE_EVALS["model"] is None or any(a is not b for a, b in zip(_BASE_EVALS["model"], model)):
        _BASE_EVALS.update(model=model, runs={})  # one pipeline kept: older ones' params can be freed
    key = (json.dumps(run.config.eval.to_dict(), sort_keys=True), run.config.seed)
    done = _BASE_EVALS["runs"].get(key)
    if done is not None and os.path.isdir(done["dir"]):
        if fileio.is_remote(out_dir):
            fileio.upload(done["dir"], out_dir)
        else:
            shutil.copytree(done["dir"], out_dir, dirs_exist_ok=True)
        return dict(done["metrics"])
    metrics = evaluate_run(run, run.pipeline.unet_params, out_dir, mesh=mesh, label="the base model")
    _BASE_EVALS["runs"][key] = {"dir": out_dir, "metrics": dict(metrics)}
    return metrics


def save_samples(run, unet_params, path: str):
    """A grid of ``config.log.sample_prompts`` held-out generations of ``unet_params`` at ``path``."""
    cfg = run.config.eval
    prompts = prompts_lib.load_prompts(cfg.prompts, limit=run.config.log.sample_prompts)
    gen = generate(run.pipeline, prompts, unet_params=sharding.host_params(unet_params), sampler=cfg.sampler,
                   num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, seed=run.config.seed,
                   batch_size=cfg.batch_size)
    with fileio.staged(path) as local:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        Image.fromarray(make_grid(gen.images)).save(local)


def base_vs_trained(run, unet_params, workdir: str, mesh=None) -> tuple[dict, dict]:
    """Evaluates the base model and ``unet_params`` on the same held-out prompts and seeds, writes
    before_after.png and prints the table. Returns (base, trained) metrics."""
    base = evaluate_base(run, os.path.join(workdir, "eval_base"), mesh)
    trained = evaluate_run(run, unet_params, os.path.join(workdir, "eval_trained"),
                           baseline=load_scores(os.path.join(workdir, "eval_base")), mesh=mesh,
                           label="the trained policy")
    before_after_grid(workdir)
    print_report(base, trained, workdir)
    return base, trained


def reward_curve(workdir: str, base: Mapping[str, float]) -> str | None:
    """reward_curve.png from the run's intermediate evaluations (config.eval.every) and the base model."""
    metric = main_reward(base)
    points = figures.eval_history(os.path.join(workdir, "metrics.jsonl"), metric)
    if len(points) < 2:
        return None
    points = [(0, base[metric])] + points
    return figures.reward_curve(points, os.path.join(workdir, "reward_curve.png"), base=base[metric],
                                label=f"held-out {metric}")


def before_after_grid(workdir):
    """before_after.png: base | trained side by side, a row per held-out prompt (``figures.before_after``)."""
    dirs = [os.path.join(workdir, d) for d in ("eval_base", "eval_trained")]
    if all(fileio.isfile(os.path.join(d, "images", "00000_00.png")) for d in dirs):
        figures.before_after(*dirs, os.path.join(workdir, "before_after.png"))


def main_reward(metrics: Mapping[str, float]) -> str:
    """The first reward's "<name>/mean" key of an evaluation's metrics (the one the run reports)."""
    return next(k for k in metrics if k.endswith("/mean") and not k.startswith(("generate/", "score/")))


def print_report(base: dict, trained: dict, workdir: str):
    """The run's final table: base and trained means/medians, trained - base and the win rate with their 95 %
    bootstrap intervals over prompts (e.g. ``+0.057 [+0.041, +0.072]``, ``0.780 [0.66, 0.89]``)."""
    lines = ["", "held-out prompts       base      trained   trained - base [95% CI]", "-" * 66]
    for key in sorted(base):
        if key.endswith("/mean") or key.endswith("/median"):
            diff = _interval_text(trained, key + "_diff", "+.3f") if key.endswith("/mean") else ""
            lines.append(f"{key:<20} {base[key]:>9.4f} {trained.get(key, float('nan')):>12.4f}{diff}")
    for key in sorted(trained):
        if key.endswith("win_rate"):
            lines.append(f"{key:<20} {'':>9} {trained[key]:>12.3f}"
                         + _interval_text(trained, key, ".2f", value=False))
    lines.append(f"before/after grid: {os.path.join(workdir, 'before_after.png')}")
    print("\n".join(lines), flush=True)


def _interval_text(metrics: Mapping[str, float], key: str, fmt: str, value: bool = True) -> str:
    """"   +0.057 [+0.041, +0.072]" from key and its _ci_low/_ci_high in metrics ("" when absent)."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return ""
    head = f"{metrics[key]:{fmt}} " if value else ""
    return f"   {head}[{low:{fmt}}, {high:{fmt}}]"


# ---------------------------------------------------------------------------------------------
# Command line.

_SETTINGS = ("sampler", "num_steps", "guidance_scale", "num_images_per_prompt", "seed", "batch_size")


# The flags a training config (or a training workdir's config.json) supplies, and their keys there.
_RUN_KEYS = {"model_path": "model_path", "sampler": "eval.sampler", "num_steps": "eval.num_steps",
             "guidance_scale": "eval.guidance_scale", "num_images_per_prompt": "eval.images_per_prompt",
             "seed": "seed", "num_prompts": "eval.num_prompts", "prompts": "eval.prompts", "reward": "eval.rewards"}


def _defaults_from_settings(settings: Mapping) -> dict:
    """The flags' values in a run's flat settings, and its dataset (``data``: name, data_dir), from which a
    ``data:SPLIT`` or dir-less ``tfds:`` prompt spec is read as the run read it."""
    out = {flag: settings[key] for flag, key in _RUN_KEYS.items() if key in settings}
    if "data.name" in settings:
        out["data"] = (settings["data.name"], settings.get("data.data_dir"))
    return out


def _defaults_from_config(config) -> dict:
    """Flag defaults a training config supplies (its model and its eval section)."""
    return {} if config is None else _defaults_from_settings(run_config.flat(config))


def _defaults_from_run(checkpoint: str | None) -> dict:
    """The same from a --checkpoint training workdir's own settings (config.json with its accepted changes):
    a run is evaluated as it evaluated itself, from the model it trained from."""
    return _defaults_from_settings(run_config.stored(checkpoint)) if _is_workdir(checkpoint) else {}


def _is_workdir(checkpoint: str | None) -> bool:
    return bool(checkpoint) and fileio.isfile(os.path.join(checkpoint, run_config.CONFIG_FILE))


def _resolve_flags(f) -> dict:
    """Explicit flags win; then the --config's values, or a --checkpoint workdir's own; then the flags'
    defaults (the paper protocol)."""
    from_config = _defaults_from_config(f.config) or _defaults_from_run(f.checkpoint)
    names = _SETTINGS + ("model_path", "num_prompts", "prompts", "reward")
    s = {name: getattr(f, name) if f[name].present or name not in from_config else from_config[name]
         for name in names}
    data = from_config.get("data")   # (name, data_dir) of the run: its data:SPLIT and dir-less tfds specs
    if s["prompts"] and data:   # each spec of a comma-separated list (a protocol's sets)
        s["prompts"] = ",".join(prompts_lib.for_run(spec.strip(), *data) for spec in s["prompts"].split(","))
    return s


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.protocol or f.compare:  # the papers' protocols and paired comparisons (docs/evaluation.md)
        from jaxpref import paper_eval
        if f.compare:
            paper_eval.run_compare(f.compare, f.out)
        else:
            paper_eval.run_protocol(f, _resolve_flags(f))
        return
    s = _resolve_flags(f)
    model_path = s["model_path"] and hub.resolve(s["model_path"], key="--model_path")   # a hub id: fetched first
    # Everything that can fail on a path fails before any generation.
    prompt_set = prompts_lib.load_prompts(s["prompts"], s["num_prompts"] or None)
    scorers = rewards.load_scorers(s["reward"], batch_size=f.score_batch_size) if s["reward"] else {}
    baseline = load_scores(f.baseline) if f.baseline else None
    mismatched = {k: v.shape[0] for k, v in (baseline or {}).items() if v.shape[0] != len(prompt_set)}
    if mismatched:
        raise ValueError(f"{f.baseline}: baseline scores cover {mismatched} prompts but --prompts gives "
                         f"{len(prompt_set)}; a win rate needs the same prompt set (and --num_prompts)")
    pipe, unet_params = export.load_trained(f.checkpoint, model_path, use_ema=f.use_ema)
    settings = {k: s[k] for k in _SETTINGS}
    source = ("" if f.config else f" (the settings of {f.checkpoint}/config.json)" if _is_workdir(f.checkpoint)
              else " (the SD1.5 protocol's defaults; --config=<a run's config> takes its own)")
    print(f"evaluating {len(prompt_set)} prompts x {settings['num_images_per_prompt']} images on "
          f"{jax.device_count()} device(s): {settings['sampler']}, {settings['num_steps']} steps, guidance "
          f"{settings['guidance_scale']}{source}", flush=True)
    if not scorers:
        print("no --reward: the images are generated and saved, nothing is scored (e.g. --reward=shapes for "
              "the shapes prompts; jaxpref.rewards lists the rewards)", flush=True)
    metrics = evaluate(pipe, prompt_set, scorers, unet_params=unet_params, out_dir=f.out, baseline_scores=baseline,
                       height=f.resolution or None, width=f.resolution or None, **settings)
    with open(os.path.join(f.out, "metrics.md")) as fh:
        print(fh.read(), flush=True)
    print(json.dumps(metrics, indent=2), flush=True)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "optional training config: supplies model_path and config.eval")
    flags.DEFINE_string("model_path", None, "base diffusers SD folder, a Hugging Face hub id org/name[@revision] "
                                            "(fetched into the HF cache) or embedded:tiny")
    flags.DEFINE_string("checkpoint", None, "policy: pipeline folder, UNet folder or training workdir (None: the base)")
    flags.DEFINE_string("prompts", "shapes", "prompt set spec (see jaxpref.prompts); with --protocol a comma list")
    flags.DEFINE_integer("num_prompts", 0, "keep the first n prompts (0: all)")
    flags.DEFINE_string("reward", "", "comma list of name or name=PATH, PATH a folder or a hub id (see "
                                      "jaxpref.rewards); default: a --config's or training workdir's eval.rewards")
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_string("baseline", None, "an earlier --out folder: per-prompt win rates against it")
    flags.DEFINE_integer("num_images_per_prompt", 5, "K images per prompt")
    flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim", "dpm++"], "sampler")
    flags.DEFINE_integer("num_steps", 50, "sampling steps")
    flags.DEFINE_float("guidance_scale", 7.5, "classifier-free guidance scale")
    flags.DEFINE_integer("seed", 0, "image k of prompt i uses seed + i + k * n_prompts")
    flags.DEFINE_integer("batch_size", 8, "images per generation call (all devices)")
    flags.DEFINE_integer("score_batch_size", 32, "images per reward-model call")
    flags.DEFINE_bool("use_ema", True, "training workdirs: evaluate the EMA params")
    flags.DEFINE_integer("resolution", 0, "image height and width in pixels (0: the model's native size)")
    flags.DEFINE_enum("protocol", None, sorted(protocols.PROTOCOLS), "a paper's evaluation protocol "
                      "(jaxpref.protocols): base and --checkpoint on its prompt sets; a flag given wins over it")
    flags.DEFINE_string("compare", None, "RUN_A,RUN_B (two earlier --out folders) or one training workdir: paired "
                                         "win rates and 95% bootstrap intervals, nothing generated")


if __name__ == "__main__":
    _define_flags()
    _console.run(main, "jaxpref.evaluate")
