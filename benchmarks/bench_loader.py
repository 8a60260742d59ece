"""Loader throughput on this machine: decoded JPEG pairs, shapes PNG pairs, and cached latents.

    python benchmarks/bench_loader.py --size 256 --pairs 512 --batch 32 --workers 0

Builds (in a temp folder) a Pick-a-Pic-like parquet of photo-like JPEG pairs at --size, runs it through the
pickapic_v2 builder, caches latents with a stand-in encoder ([size/8, size/8, 4] fp16, as SD's VAE
gives), then times make_loader over each source (after one warm-up batch) and prints a table.
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxpref.data import build_latent_cache, build_pickapic, make_loader, open_source, prepare_shapes  # noqa: E402


def _photo(rng, size: int) -> bytes:
    from PIL import Image

    low = rng.uniform(0, 255, (size // 32 + 2, size // 32 + 2, 3)).astype(np.uint8)
    im = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    arr = np.clip(np.asarray(im, np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _parquet(folder: pathlib.Path, n: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [{"caption": f"a photo number {i}", "jpg_0": _photo(rng, size), "jpg_1": _photo(rng, size),
             "label_0": float(i % 2), "label_1": float(1 - i % 2), "image_0_uid": f"{i}a", "image_1_uid": f"{i}b"}
            for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001-bench.parquet")


def _encode(images: np.ndarray):
    x = images.astype(np.float32) / 127.5 - 1
    B, H, W, _ = x.shape
    m = x.reshape(B, H // 8, 8, W // 8, 8, 3).mean((2, 4))
    m = np.concatenate([m, m[..., :1]], -1)
    return m, np.full_like(m, 0.1)


def _time(src, batch: int, steps: int, workers: int, **kw) -> float:
    it = make_loader(src, batch, seed=0, process_index=0, process_count=1, worker_count=workers, **kw)
    next(it)  # warm-up: threads / workers start, first reads
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="JPEG side (stored after the builder's resize)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder)")
    a = p.parse_args(argv)
    root = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="bench_loader_"))
    t = time.perf_counter()
    _parquet(root / "parquet", a.pairs, a.size)
    b = build_pickapic(root / "parquet", root / "tfds", resolution=a.size, splits=["train"])
    t_build = time.perf_counter() - t
    jpg = open_source(f"pickapic_v2/{b.builder_config.name}", "train", root / "tfds")
    t = time.perf_counter()
    build_latent_cache(f"pickapic_v2/{b.builder_config.name}", root / "latents", _encode, data_dir=root / "tfds",
                       shard_size=1024, batch_size=32)
    t_cache = time.perf_counter() - t
    lat = open_source(root / "latents")
    shp = open_source("shapes/" + prepare_shapes(root / "tfds").builder_config.name, "train", root / "tfds")

    rows = []
    for w in a.workers:
        rows.append(("pickapic_v2 JPEG pairs (decoded)", f"{a.size}px", w,
                     _time(jpg, a.batch, a.steps, w)))
        rows.append(("shapes PNG pairs", "32px", w, _time(shp, a.batch, a.steps, w)))
        rows.append(("latent cache pairs (fp16)", f"{a.size // 8}x{a.size // 8}x4", w,
                     _time(lat, a.batch, a.steps * 4, w)))
    print(f"\nmachine: {__import__('os').cpu_count()} CPU cores; batch {a.batch}; {a.pairs} pairs; "
          f"build {t_build:.1f}s (pickapic_v2 at {a.size}px), latent cache {t_cache:.1f}s")
    print(f"{'source':<34} {'size':>10} {'workers':>8} {'pairs/s':>10}")
    for name, size, w, rate in rows:
        print(f"{name:<34} {size:>10} {w:>8} {rate:>10.0f}")


if __name__ == "__main__":
    main()
