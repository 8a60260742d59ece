"""Reward scores for both images of every pair, with the dataset-wide min and max (SmPO's soft labels).

    python -m jaxpref.data.scores --dataset pickapic_v2 --split train --data_dir /data/tfds \\
        --scorer pickscore:yuvalkirstain/PickScore_v1 --out /data/scores/pickapic_train
    python -m jaxpref.data.scores --dataset shapes --scorer shapes --out /tmp/scores   # the analytic reward

Output: scores.npy float32 [N, 2] aligned with the source's record order (NaN where an image failed to
decode), meta.json with reward_min / reward_max over all finite scores. Resumable shard by shard like the
latent cache. Use it with `open_source(dataset, split, data_dir, scores=<out>)`: the batches' rewards then
come from here.

A scorer is any callable `score_fn(images uint8 [B, H, W, 3], captions list[str]) -> [B]`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from typing import Callable, Sequence

import numpy as np

from jaxpref import hub
from jaxpref.data import common, records
from jaxpref.world import shapes
from jaxpref.data.sources import open_source

ScoreFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def pickscore_fn(clip_folder: str | os.PathLike, logit_scale: bool = False, batch_size: int = 32) -> ScoreFn:
    """PickScore from an HF CLIPModel folder (PickScore_v1, with its processor files), by our Flax CLIP (no torch;
    ``jaxpref.rewards``' PickScore, checked against transformers).

    logit_scale=False gives the cosine of the normalised embeddings (SmPO's soft labels, docs/methods.md §3);
    True multiplies by exp(logit_scale) as PickScore's reported numbers do.
    """
    from jaxpref.rewards import clip_rewards, scorer

    backbone = clip_rewards.load_hf_clip(os.fspath(clip_folder), "PickScore")
    score = (clip_rewards.pickscore_scorer(backbone, batch_size) if logit_scale else
             scorer.Scorer("pickscore_cosine", clip_rewards.cosine_fn(backbone), batch_size=batch_size))
    return lambda images, captions: score(np.asarray(images, np.uint8), [common.as_str(c) for c in captions])


def get_scorer(spec: str) -> ScoreFn:
    """'shapes' (analytic reward) | 'pickscore:<folder>' (cosine) | 'pickscore_scaled:<folder>'; the folder may be
    a Hugging Face hub id (pickscore:yuvalkirstain/PickScore_v1), fetched into the HF cache first."""
    if spec == "shapes":
        return shapes.score_fn
    kind, _, folder = spec.partition(":")
    if kind in ("pickscore", "pickscore_scaled") and folder:
        folder = hub.resolve(folder, key=f"--scorer {kind}", components=None)
        return pickscore_fn(folder, logit_scale=kind == "pickscore_scaled")
    raise ValueError(f"scorer {spec!r}: expected 'shapes', 'pickscore:<CLIPModel folder or hub id>' or "
                     "'pickscore_scaled:<folder or hub id>'")


def score_records(src, indices: Sequence[int], cols: Sequence[str], score_fn: ScoreFn, resolution, batch_size, pool):
    """Scores [len(indices), len(cols)] (NaN where an image fails to decode) and the (index, reason) skips."""
    out = np.full((len(indices), len(cols)), np.nan, np.float32)
    skipped = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        recs = [src[i] for i in chunk]

        def decode(rec):
            try:
                return [common.decode_image(rec[c], resolution) for c in cols]
            except Exception as e:  # noqa: BLE001
                return f"corrupt image: {type(e).__name__}: {e}"

        decoded = list(pool.map(decode, recs))
        ok = [j for j, d in enumerate(decoded) if not isinstance(d, str)]
        skipped += [(chunk[j], decoded[j]) for j in range(len(chunk)) if isinstance(decoded[j], str)]
        if not ok:
            continue
        images = np.stack([im for j in ok for im in decoded[j]])
        caps = [common.as_str(recs[j]["caption"]) for j in ok for _ in cols]
        s = np.asarray(score_fn(images, caps), np.float32).reshape(len(ok), len(cols))
        out[[start + j for j in ok]] = s
    return out, skipped


def build_scores(dataset: str, out_dir: str | os.PathLike, score_fn: ScoreFn, *, split: str = "train",
                 data_dir: str | os.PathLike | None = None, scorer_name: str = "custom",
                 resolution: int | None = None, batch_size: int = 64, shard_size: int = 4096,
                 max_shards: int | None = None) -> dict:
    """Score both images of every pair of dataset[split] into out_dir; returns meta (reward_min, reward_max)."""
    src = open_source(dataset, split, data_dir)
    if src.kind != "pairs":
        raise ValueError(f"{dataset}: scores are for pair datasets; {src.name} has single images")
    settings = {"dataset": src.name, "split": split, "scorer": scorer_name, "resolution": resolution}
    job = records.ShardedJob(out_dir, "scores", settings, len(src), shard_size)
    t0, new = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for shard in job.pending():
            if max_shards is not None and new >= max_shards:
                break
            idx = list(job.shard_range(shard))
            s, skipped = score_records(src, idx, ("jpg_0", "jpg_1"), score_fn, resolution, batch_size, pool)
            path = job.shard_path(shard, "npy")
            np.save(path.with_name(path.name + ".tmp.npy"), s)
            os.replace(path.with_name(path.name + ".tmp.npy"), path)
            job.mark_done(shard, {"skipped": skipped})
            new += 1
    if job.pending():
        print(f"scores {out_dir}: {job.num_shards - len(job.pending())}/{job.num_shards} shards done; rerun to continue",
              flush=True)
        return job.meta
    done = job.done_info()
    scores = np.concatenate([np.load(job.shard_path(s, "npy")) for s in done])
    np.save(job.dir / "scores.npy", scores)
    report = common.BuildReport(f"scores {src.name}[{split}]")
    for info in done.values():
        for i, why in info["skipped"]:
            report.skip(f"{src.name}[{split}]", i, why)
    finite = scores[np.isfinite(scores)]
    report.kept = int(np.isfinite(scores).all(axis=1).sum())
    if finite.size == 0:
        raise ValueError(f"scores {out_dir}: no image could be scored; see {job.dir / 'progress.json'}")
    meta = job.finish(reward_min=float(finite.min()), reward_max=float(finite.max()),
                      reward_mean=float(finite.mean()), report=report.to_json())
    print(f"{report.summary()}; rewards in [{meta['reward_min']:.4f}, {meta['reward_max']:.4f}] "
          f"({time.time() - t0:.1f}s this run)", flush=True)
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--split", default="train")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--scorer", default="shapes", help="shapes | pickscore:<CLIPModel folder or hub id, e.g. "
                   "yuvalkirstain/PickScore_v1> | pickscore_scaled:<folder or hub id>")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--shard_size", type=int, default=4096)
    a = p.parse_args(argv)
    build_scores(a.dataset, a.out, get_scorer(a.scorer), split=a.split, data_dir=a.data_dir, scorer_name=a.scorer,
                 resolution=a.resolution, batch_size=a.batch_size, shard_size=a.shard_size)


if __name__ == "__main__":
    from jaxpref import console
    console.run_argparse(main, "jaxpref.data.scores")
