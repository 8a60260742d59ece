"""SD1.5's top transformer block (64x64 latents: 4096 tokens, 320 channels, 8 heads of 40, 77 text tokens),
forward and gradient as the train step runs it, compiled by the TPU compiler for a topology on this host:
temporaries per chip with dense XLA attention vs the Pallas flash kernel. The full SD1.5 step takes ~10 min
of 2 cores to compile (benchmarks/tpu_aot.sh); one block takes about a minute and shows where the step's
memory goes. Prints a table, writes benchmarks/results/tpu_aot/sd15_top_block_<topology>_<images>img.json.

  python benchmarks/tpu_attention_block.py [--topology v5e:2x4] [--images_per_chip 8]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import aot, sharding
from jaxpref.models import attention
from jaxpref.models.unet import BasicTransformerBlock

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_aot")


def compile_block(mesh, backend: str, images: int, remat: bool = True):
    """The block's gradient (bf16 compute, fp32 params, remat as the configs ship) compiled for ``mesh``."""
    block = BasicTransformerBlock(heads=8, dim_head=40, attention_impl=backend, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((images, 4096, 320), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((images, 77, 768), jnp.bfloat16)
    with attention.use_mesh(mesh):
        params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, text)
    apply = jax.checkpoint(block.apply) if remat else block.apply
    loss = lambda p, x, text: jnp.sum(apply(p, x, text).astype(jnp.float32) ** 2)  # noqa: E731
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    with attention.use_mesh(mesh):
        fn = jax.jit(jax.grad(loss, (0, 1)), in_shardings=(sharding.replicated(mesh), rows, rows))
        lowered = fn.lower(params, x, text)
    start = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"attention": backend, "uses_pallas_attention": "tpu_custom_call" in lowered.as_text(),
            "temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "compile_seconds": time.perf_counter() - start,
            "largest_buffers": aot.largest_buffers(compiled.as_text(), 5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--images_per_chip", type=int, default=8, help="DPO at 4 pairs/chip runs 8 images")
    args = parser.parse_args()
    devices = aot.topology_devices(args.topology)
    mesh = sharding.make_mesh(1, len(devices), devices=devices)
    images = args.images_per_chip * len(devices)
    rows = [compile_block(mesh, b, images) for b in ("pallas_tpu", "xla")]
    result = {"what": "SD1.5 top transformer block, forward + gradient, bf16, remat, per chip", "topology": args.topology,
              "device_kind": devices[0].device_kind, "images_per_chip": args.images_per_chip, "jax": jax.__version__,
              "rows": rows}
    print(f"{result['what']}, {args.topology} ({result['device_kind']}), {args.images_per_chip} images/chip")
    for r in rows:
        print(f"  {r['attention']:<11} temporaries {r['temp'] / 2**30:7.3f} GiB  (compiled in {r['compile_seconds']:.0f} s)")
        for b in r["largest_buffers"][:3]:
            print(f"      {b['bytes'] / 2**30:7.3f} GiB  {b['shape']:<26} {b['op'][:90]}")
    os.makedirs(OUT, exist_ok=True)
    name = f"sd15_top_block_{args.topology.replace(':', '-')}_{args.images_per_chip}img.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
