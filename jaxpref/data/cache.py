"""Latent cache: VAE posterior mean and std (fp16/bf16) plus token ids per record, so a train step runs no VAE.

    python -m jaxpref.data.cache --dataset pickapic_v2 --split train --data_dir /data/tfds \\
        --vae /ckpt/sd15/vae --tokenizer /ckpt/sd15/tokenizer --resolution 512 --out /data/cache/pickapic_train

Resumable: the output folder holds one shard per `shard_size` source records plus progress.json; rerunning
the same command skips finished shards (a different command on the same folder is refused). Records whose
images fail to decode are skipped and listed in meta.json's report. Read it back with
`open_source(<out>)` + `make_loader` (batches carry latent_mean / latent_std instead of images).

Record layout (pairs; single-image sources drop the leading 2):
  latent_mean, latent_std  [2, h, w, c] cache dtype (unscaled VAE posterior; latent = mean + std * eps)
  latent_mean_flip, ...    the same for horizontally flipped images (with --flips; the loader picks one)
  time_ids, time_ids_flip  float32 [2, 6] / [6]: each image's (original size, center-crop top-left, target
                           size), SDXL's size conditioning (and that of the flipped crop)
  input_ids int32 [L], caption str, label_0/label_1 (pairs) or reward, reward_0/reward_1, index int64.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from jaxpref import hub
from jaxpref.data import common, records
from jaxpref.data.sources import open_source
from jaxpref.data.tokenizer import load_tokenizer, tokenize
from jaxpref.models import vae as vae_lib

EncodeFn = Callable[[np.ndarray], tuple]  # uint8 [B, H, W, 3] -> (mean [B, h, w, c], std [B, h, w, c])


def vae_encode_fn(vae_folder: str | os.PathLike) -> EncodeFn:
    """encode_fn from our Flax VAE (jaxpref.models.load_vae): images uint8 -> (posterior mean, std) numpy, by
    ``jaxpref.models.vae.posterior`` (pixels to [-1, 1]; logvar clipped as diffusers' DiagonalGaussianDistribution)."""
    module, params = vae_lib.load_vae(os.fspath(vae_folder))
    enc = jax.jit(lambda p, images: vae_lib.posterior(module, p, images))

    def encode_fn(images: np.ndarray):
        mean, std = enc(params, jnp.asarray(images))
        return np.asarray(mean), np.asarray(std)

    return encode_fn


def _cast(x, dtype: str) -> np.ndarray:
    return np.asarray(x, np.float32).astype(records._dtype(dtype))


def build_latent_cache(dataset: str, out_dir: str | os.PathLike, encode_fn: EncodeFn, *, split: str = "train",
                       data_dir: str | os.PathLike | None = None, scores: str | os.PathLike | None = None,
                       encoder_name: str = "custom", tokenizer: str | os.PathLike | None = None,
                       max_length: int | None = None, resolution: int | None = None, batch_size: int = 32,
                       shard_size: int = 2048, dtype: str = "float16", flips: bool = False,
                       max_shards: int | None = None) -> dict:
    """Encode every record of `dataset[split]` into out_dir; returns meta (or partial meta after max_shards).

    encode_fn: uint8 images [N, H, W, 3] -> (mean, std) [N, h, w, c]; called with up to 2*batch_size images
    (4x with flips). encoder_name is recorded so that resuming with another encoder is refused.
    resolution: resize shorter side + center crop before encoding (None: stored size).
    max_shards: stop after this many new shards (for tests / time-boxed runs); rerun to continue.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    src = open_source(dataset, split, data_dir, scores=scores)
    if src.kind not in ("pairs", "images"):
        raise ValueError(f"{dataset}: cannot cache a {src.kind} source")
    tok = load_tokenizer(None if tokenizer is None else os.fspath(tokenizer))
    settings = {"dataset": src.name, "split": split, "scores": None if scores is None else os.fspath(scores),
                "encoder": encoder_name, "tokenizer": None if tokenizer is None else os.fspath(tokenizer),
                "max_length": max_length or tok.model_max_length, "resolution": resolution, "dtype": dtype,
                "flips": flips}
    job = records.ShardedJob(out_dir, "latents", settings, len(src), shard_size)
    cols = ("jpg_0", "jpg_1") if src.kind == "pairs" else ("jpg",)
    report = common.BuildReport(f"latent cache {src.name}[{split}]")
    t0, new = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for shard in job.pending():
            if max_shards is not None and new >= max_shards:
                break
            out, skipped = [], []
            idx = list(job.shard_range(shard))
            for start in range(0, len(idx), batch_size):
                recs = [(i, src[i]) for i in idx[start:start + batch_size]]

                def decode(item):
                    i, rec = item
                    try:
                        return [common.decode_image_with_time_ids(rec[c], resolution) for c in cols]
                    except Exception as e:  # noqa: BLE001 - corrupt data is skipped, not fatal
                        return f"corrupt image: {type(e).__name__}: {e}"

                decoded = list(pool.map(decode, recs))
                good = [(i, rec, ims) for (i, rec), ims in zip(recs, decoded) if not isinstance(ims, str)]
                for (i, _), ims in zip(recs, decoded):
                    if isinstance(ims, str):
                        skipped.append((i, ims))
                if not good:
                    continue
                images = np.stack([im for _, _, ims in good for im, _ in ims])
                if flips:
                    images = np.concatenate([images, images[:, :, ::-1]])
                mean, std = encode_fn(images)
                mean, std = _cast(mean, dtype), _cast(std, dtype)
                n = len(good) * len(cols)
                ids = tokenize(tok, [common.as_str(rec.get("caption", "")) for _, rec, _ in good], settings["max_length"])
                for j, (i, rec, _) in enumerate(good):
                    sl = slice(j * len(cols), (j + 1) * len(cols))
                    squeeze = (lambda a: a[0]) if len(cols) == 1 else (lambda a: a)
                    r = {"latent_mean": squeeze(mean[:n][sl]), "latent_std": squeeze(std[:n][sl])}
                    if flips:
                        r["latent_mean_flip"], r["latent_std_flip"] = squeeze(mean[n:][sl]), squeeze(std[n:][sl])
                    r.update(input_ids=ids[j], caption=common.as_str(rec.get("caption", "")), index=np.int64(i))
                    time_ids = squeeze(np.stack([t for _, t in good[j][2]]))  # SDXL's size conditioning
                    r["time_ids"] = time_ids
                    if flips:
                        r["time_ids_flip"] = common.flipped_time_ids(time_ids)
                    for k in ("label_0", "label_1", "reward_0", "reward_1", "reward"):
                        if k in rec:
                            r[k] = np.float32(rec[k])
                    out.append(r)
            n_written = records.write_shard(job.shard_path(shard), out) if out else 0
            job.mark_done(shard, {"records": n_written, "skipped": skipped})
            new += 1
            common.log.info("latent cache: shard %d/%d done (%d records)", shard + 1, job.num_shards, n_written)
    if job.pending():
        print(f"latent cache {out_dir}: {job.num_shards - len(job.pending())}/{job.num_shards} shards done; "
              "rerun to continue", flush=True)
        return job.meta
    done = job.done_info()
    for s, info in done.items():
        for i, why in info["skipped"]:
            report.skip(f"{src.name}[{split}]", i, why)
        report.kept += info["records"]
    files = [job.shard_path(s).name for s, info in done.items() if info["records"]]
    sample = records.decode_record(_first_record(job.dir / files[0])) if files else {}
    meta = job.finish(
        num_records=report.kept, files=files, layout=src.kind, dtype=dtype,
        latent_shape=list(np.shape(sample.get("latent_mean", ()))),
        empty_ids=tokenize(tok, [""], settings["max_length"])[0].tolist(),
        reward_range=src.reward_range, report=report.to_json())
    print(f"{report.summary()}; {job.num_shards} shards in {out_dir} ({time.time() - t0:.1f}s this run)", flush=True)
    return meta


def _first_record(path) -> bytes:
    r = ArrayRecordReader(os.fspath(path))
    try:
        return r.read([0])[0]
    finally:
        r.close()


def _component(value: str, component: str, flag: str) -> str:
    """A local folder for ``--vae`` / ``--tokenizer``: a hub id is fetched first, and a pipeline stands for its
    ``component`` subfolder."""
    folder = hub.resolve(value, key=flag, components=(component,))
    if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isdir(os.path.join(folder, component)):
        return os.path.join(folder, component)
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes", help="shapes | shapes/base | pickapic_v2[/<config>]")
    p.add_argument("--split", default="train")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--scores", default=None, help="a scores folder (python -m jaxpref.data.scores) to carry rewards")
    p.add_argument("--vae", required=True, help="diffusers VAE folder, loaded with jaxpref.models.load_vae, or a "
                   "hub id (stable-diffusion-v1-5/stable-diffusion-v1-5/vae; a pipeline's id: its vae/)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or hub id (a pipeline's: its tokenizer/; "
                   "default: the shapes tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--shard_size", type=int, default=2048)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--flips", action="store_true", help="also cache latents of flipped images")
    a = p.parse_args(argv)
    vae = _component(a.vae, "vae", "--vae")
    tokenizer = a.tokenizer and _component(a.tokenizer, "tokenizer", "--tokenizer")
    encoder_name = a.vae if hub.is_hub_id(a.vae) else os.path.abspath(a.vae)
    build_latent_cache(a.dataset, a.out, vae_encode_fn(vae), split=a.split, data_dir=a.data_dir, scores=a.scores,
                       encoder_name=encoder_name, tokenizer=tokenizer, resolution=a.resolution,
                       batch_size=a.batch_size, shard_size=a.shard_size, dtype=a.dtype, flips=a.flips)


if __name__ == "__main__":
    from jaxpref import console
    console.run_argparse(main, "jaxpref.data.cache")
