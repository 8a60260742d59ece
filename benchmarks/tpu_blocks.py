"""Pieces of the SD1.5 train step, forward + gradient as the step runs them (bf16 compute, fp32 params),
compiled by the TPU compiler for a topology on this host: where the step's memory goes, in about a minute per
compile (the whole SD1.5 step takes over 10 minutes of 2 cores, benchmarks/tpu_aot.sh). Two studies:

  attention  SD1.5's top transformer block (4096 tokens, 320 channels, 8 heads of 40, 77 text tokens), remat:
             temporaries per chip with dense XLA attention vs the Pallas flash kernel
             -> results/tpu_aot/sd15_top_block_<topology>_<images>img.json
  remat      SD1.5's first down block (two resnets + two transformer blocks at 64x64x320, pallas_tpu):
             temporaries and FLOPs per chip without remat and with each ``remat_policy``
             -> results/tpu_aot/sd15_down_block_remat_<topology>_<images>img.json

  python benchmarks/tpu_blocks.py attention|remat [--topology v5e:2x4] [--images_per_chip 8]
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
from jaxpref.models.unet import REMAT_POLICIES, BasicTransformerBlock, DownBlock2D

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_aot")


def compile_gradient(mesh, loss, params, *inputs, argnums=0) -> dict:
    """``grad(loss, argnums)`` (params: argument 0, replicated; inputs split over the mesh's batch axes): the
    compiled program's per-chip memory and FLOPs, and its largest buffers."""
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    with attention.use_mesh(mesh):
        fn = jax.jit(jax.grad(loss, argnums), in_shardings=(sharding.replicated(mesh), *[rows] * len(inputs)))
        lowered = fn.lower(params, *inputs)
    start = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"uses_pallas_attention": "tpu_custom_call" in lowered.as_text(), "temp": int(m.temp_size_in_bytes),
            "argument": int(m.argument_size_in_bytes), "flops": float(compiled.cost_analysis().get("flops", 0.0)),
            "compile_seconds": time.perf_counter() - start,
            "largest_buffers": aot.largest_buffers(compiled.as_text(), 5)}


def _abstract_params(mesh, module, *inputs):
    with attention.use_mesh(mesh):
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)


def attention_rows(mesh, images: int) -> list[dict]:
    """The top transformer block (remat, as the configs ship) with each attention backend; the gradient w.r.t.
    the block's input too (what the blocks below it need)."""
    x = jax.ShapeDtypeStruct((images, 4096, 320), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((images, 77, 768), jnp.bfloat16)
    rows = []
    for backend in ("pallas_tpu", "xla"):
        block = BasicTransformerBlock(heads=8, dim_head=40, attention_impl=backend, dtype=jnp.bfloat16)
        apply = jax.checkpoint(block.apply)
        loss = lambda p, x, text: jnp.sum(apply(p, x, text).astype(jnp.float32) ** 2)  # noqa: E731
        params = _abstract_params(mesh, block, x, text)
        rows.append({"attention": backend, **compile_gradient(mesh, loss, params, x, text, argnums=(0, 1))})
    return rows


def remat_rows(mesh, images: int) -> list[dict]:
    """The first down block without remat and with each remat policy."""
    x = jax.ShapeDtypeStruct((images, 64, 64, 320), jnp.bfloat16)
    temb = jax.ShapeDtypeStruct((images, 1280), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((images, 77, 768), jnp.bfloat16)
    rows = []
    for policy in (None, *REMAT_POLICIES):
        block = DownBlock2D(out_channels=320, num_layers=2, cross_attention=True, heads=8, remat=policy is not None,
                            remat_policy=policy or "nothing_saveable", attention_impl="pallas_tpu", dtype=jnp.bfloat16)

        def loss(p, x, temb, text, block=block):
            out, skips = block.apply(p, x, temb, text)
            return sum(jnp.sum(s.astype(jnp.float32) ** 2) for s in (out, *skips))

        rows.append({"remat_policy": policy or "no remat",
                     **compile_gradient(mesh, loss, _abstract_params(mesh, block, x, temb, text), x, temb, text)})
    return rows


STUDIES = {
    "attention": ("SD1.5 top transformer block, forward + gradient, bf16, remat, per chip", "attention",
                  attention_rows, "sd15_top_block"),
    "remat": ("SD1.5 first down block (2 resnets + 2 transformer blocks, 64x64x320), forward + gradient, bf16, "
              "pallas_tpu attention, per chip", "remat_policy", remat_rows, "sd15_down_block_remat"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--images_per_chip", type=int, default=8, help="DPO at 4 pairs/chip runs 8 images")
    args = parser.parse_args()
    what, label, build_rows, stem = STUDIES[args.study]
    devices = aot.topology_devices(args.topology)
    mesh = sharding.make_mesh(1, len(devices), devices=devices)
    rows = build_rows(mesh, args.images_per_chip * len(devices))
    result = {"what": what, "topology": args.topology, "device_kind": devices[0].device_kind,
              "images_per_chip": args.images_per_chip, "jax": jax.__version__, "rows": rows}
    print(f"{what}, {args.topology} ({result['device_kind']}), {args.images_per_chip} images/chip")
    for r in rows:
        print(f"  {r[label]:<34} temporaries {r['temp'] / 2**30:7.3f} GiB  {r['flops'] / 1e12:6.2f} TFLOP"
              f"  (compiled in {r['compile_seconds']:.0f} s)")
        for b in r["largest_buffers"][:3]:
            print(f"      {b['bytes'] / 2**30:7.3f} GiB  {b['shape']:<26} {b['op'][:90]}")
    os.makedirs(OUT, exist_ok=True)
    name = f"{stem}_{args.topology.replace(':', '-')}_{args.images_per_chip}img.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
