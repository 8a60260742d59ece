"""DRO experts: every unique (image, caption) of a pair dataset scored, the global top K kept (docs/methods.md §2).

    python -m jaxpref.data.experts --dataset pickapic_v2 --data_dir /data/tfds \\
        --scorer pickscore_scaled:yuvalkirstain/PickScore_v1 --k 500 --out /data/experts/pickapic_top500
    python -m jaxpref.data.experts --dataset shapes --scorer shapes --out /tmp/shapes_experts

Images are identified by their uid (image_0_uid / image_1_uid; a hash of the bytes when empty), so an image
shown in several pairs with the same caption is scored once and kept at most once. Human labels are not
used. Resumable: each shard keeps its own top K candidates (the global top K is inside their union).
`--scores <folder>` reuses pair scores from python -m jaxpref.data.scores instead of scoring again.

Output: a folder read by `open_source(<out>)` (kind 'images': caption, jpg, reward, uid, source), sorted by
reward, best first; `make_loader` then yields DRO expert batches (images, input_ids, reward).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import time

import numpy as np

from jaxpref.data import common, records
from jaxpref.data.scores import ScoreFn, get_scorer, score_records
from jaxpref.data.sources import open_source


def _uid(rec: dict, slot: int, cols) -> str:
    uid = common.as_str(rec.get(f"image_{slot}_uid" if len(cols) == 2 else "uid", ""))
    return uid or "sha1:" + hashlib.sha1(bytes(rec[cols[slot]])).hexdigest()


def build_experts(dataset: str, out_dir: str | os.PathLike, score_fn: ScoreFn | None = None, *, k: int = 500,
                  split: str = "train", data_dir: str | os.PathLike | None = None,
                  scores: str | os.PathLike | None = None, scorer_name: str = "custom", resolution: int | None = None,
                  batch_size: int = 64, shard_size: int = 8192, max_shards: int | None = None) -> dict:
    """Write the global top-k unique (image, caption) of dataset[split] by score_fn (or by `scores`) to out_dir."""
    src = open_source(dataset, split, data_dir, scores=scores)
    if src.kind not in ("pairs", "images"):
        raise ValueError(f"{dataset}: experts need a pair or image dataset, got {src.kind}")
    if score_fn is None and scores is None:
        raise ValueError("build_experts: give score_fn or a scores folder")
    cols = ("jpg_0", "jpg_1") if src.kind == "pairs" else ("jpg",)
    settings = {"dataset": src.name, "split": split, "k": k, "resolution": resolution,
                "scorer": f"scores:{os.fspath(scores)}" if scores is not None else scorer_name}
    job = records.ShardedJob(out_dir, "experts", settings, len(src), shard_size)
    if job.meta.get("complete"):
        return job.meta  # built before with these settings: read, never rewritten
    t0, new = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for shard in job.pending():
            if max_shards is not None and new >= max_shards:
                break
            idx = list(job.shard_range(shard))
            best: dict[tuple[str, str], tuple] = {}
            skipped = []
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                recs = [src[i] for i in chunk]
                todo, queued = [], set()  # (index, slot, key) not seen in this shard yet
                for i, rec in zip(chunk, recs):
                    cap = common.as_str(rec["caption"])
                    for slot in range(len(cols)):
                        key = (_uid(rec, slot, cols), cap)
                        if key not in best and key not in queued:
                            todo.append((i, slot, key))
                            queued.add(key)
                if scores is not None:
                    by_index = dict(zip(chunk, recs))
                    vals = [float(by_index[i][f"reward_{slot}"]) for i, slot, _ in todo]
                else:
                    rows = sorted({i for i, _, _ in todo})
                    s, sk = score_records(src, rows, cols, score_fn, resolution, batch_size, pool)
                    skipped += sk
                    pos = {i: r for r, i in enumerate(rows)}
                    vals = [float(s[pos[i], slot]) for i, slot, _ in todo]
                for (i, slot, key), v in zip(todo, vals):
                    if np.isfinite(v):
                        best[key] = (v, i, slot, key)
            top = sorted(best.values(), key=lambda t: (-t[0], t[1], t[2]))[:k]
            cand = [{"score": v, "index": i, "slot": slot, "uid": key[0], "caption": key[1]} for v, i, slot, key in top]
            path = job.shard_path(shard, "json")
            records.write_text_atomic(path, json.dumps(cand))
            job.mark_done(shard, {"unique": len(best), "skipped": skipped})
            new += 1
    if job.pending():
        print(f"experts {out_dir}: {job.num_shards - len(job.pending())}/{job.num_shards} shards done; rerun to continue",
              flush=True)
        return job.meta
    done = job.done_info()
    merged: dict[tuple[str, str], dict] = {}
    for s in done:
        for c in json.loads(job.shard_path(s, "json").read_text()):
            key = (c["uid"], c["caption"])
            if key not in merged or c["score"] > merged[key]["score"]:
                merged[key] = c
    top = sorted(merged.values(), key=lambda c: (-c["score"], c["index"], c["slot"]))[:k]
    out = []
    for c in top:
        rec = src[c["index"]]
        out.append({"caption": c["caption"], "jpg": bytes(rec[cols[c["slot"]]]), "reward": np.float32(c["score"]),
                    "uid": c["uid"], "source": f"{src.name}[{split}]:{c['index']}:{c['slot']}"})
    fname = "experts.array_record"
    records.write_shard(job.dir / fname, out)
    report = common.BuildReport(f"experts {src.name}[{split}]")
    for info in done.values():
        for i, why in info["skipped"]:
            report.skip(f"{src.name}[{split}]", i, why)
    report.kept = len(out)
    rewards = np.asarray([c["score"] for c in top], np.float32)
    meta = job.finish(num_records=len(out), files=[fname], layout="images",
                      unique_scored=sum(info["unique"] for info in done.values()),
                      reward_range=[float(rewards.min()), float(rewards.max())] if len(out) else None,
                      report=report.to_json())
    print(f"{report.summary()}; top {len(out)} rewards in [{rewards.min() if len(out) else 'nan'}, "
          f"{rewards.max() if len(out) else 'nan'}] ({time.time() - t0:.1f}s this run)", flush=True)
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--split", default="train")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--scorer", default="shapes", help="shapes | pickscore:<CLIPModel folder or hub id, e.g. "
                   "yuvalkirstain/PickScore_v1> | pickscore_scaled:<folder or hub id>")
    p.add_argument("--scores", default=None, help="reuse a scores folder instead of --scorer")
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--shard_size", type=int, default=8192)
    a = p.parse_args(argv)
    build_experts(a.dataset, a.out, None if a.scores else get_scorer(a.scorer), k=a.k, split=a.split,
                  data_dir=a.data_dir, scores=a.scores, scorer_name=a.scorer, resolution=a.resolution,
                  batch_size=a.batch_size, shard_size=a.shard_size)


if __name__ == "__main__":
    from jaxpref import console
    console.run_argparse(main, "jaxpref.data.experts")
