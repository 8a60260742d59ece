"""What each ``remat_policy`` costs on a TPU: SD1.5's first down block (64x64 latents, 320 channels, two
resnets and two transformer blocks, Pallas flash attention, bf16 compute, fp32 params) forward + gradient,
compiled by the TPU compiler for a topology on this host; temporaries per chip without remat and with each
policy of ``jaxpref.models.unet.REMAT_POLICIES``. Prints a table, writes
benchmarks/results/tpu_aot/sd15_down_block_remat_<topology>_<images>img.json.

  python benchmarks/tpu_remat_policies.py [--topology v5e:2x4] [--images_per_chip 8]
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
from jaxpref.models.unet import REMAT_POLICIES, DownBlock2D

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_aot")


def compile_block(mesh, images: int, remat_policy: str | None):
    """The block's gradient compiled for ``mesh``; ``remat_policy=None``: no remat."""
    block = DownBlock2D(out_channels=320, num_layers=2, cross_attention=True, heads=8, remat=remat_policy is not None,
                        remat_policy=remat_policy or "nothing_saveable", attention_impl="pallas_tpu",
                        dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((images, 64, 64, 320), jnp.bfloat16)
    temb = jax.ShapeDtypeStruct((images, 1280), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((images, 77, 768), jnp.bfloat16)
    with attention.use_mesh(mesh):
        params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, temb, text)

    def loss(p, x, temb, text):
        out, skips = block.apply(p, x, temb, text)
        return sum(jnp.sum(s.astype(jnp.float32) ** 2) for s in (out, *skips))

    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    with attention.use_mesh(mesh):
        fn = jax.jit(jax.grad(loss), in_shardings=(sharding.replicated(mesh), rows, rows, rows))
        lowered = fn.lower(params, x, temb, text)
    start = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"remat_policy": remat_policy or "no remat", "temp": int(m.temp_size_in_bytes),
            "argument": int(m.argument_size_in_bytes), "flops": float(compiled.cost_analysis().get("flops", 0.0)),
            "compile_seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--images_per_chip", type=int, default=8, help="DPO at 4 pairs/chip runs 8 images")
    args = parser.parse_args()
    devices = aot.topology_devices(args.topology)
    mesh = sharding.make_mesh(1, len(devices), devices=devices)
    rows = [compile_block(mesh, args.images_per_chip * len(devices), p) for p in (None, *REMAT_POLICIES)]
    result = {"what": "SD1.5 first down block (2 resnets + 2 transformer blocks, 64x64x320), forward + gradient, "
                      "bf16, pallas_tpu attention, per chip",
              "topology": args.topology, "device_kind": devices[0].device_kind,
              "images_per_chip": args.images_per_chip, "jax": jax.__version__, "rows": rows}
    print(f"{result['what']}, {args.topology} ({result['device_kind']}), {args.images_per_chip} images/chip")
    print(f"  {'remat policy':<34}{'temporaries':>14}{'TFLOP/chip':>12}")
    for r in rows:
        print(f"  {r['remat_policy']:<34}{r['temp'] / 2**30:10.3f} GiB{r['flops'] / 1e12:12.2f}"
              f"   (compiled in {r['compile_seconds']:.0f} s)")
    os.makedirs(OUT, exist_ok=True)
    name = f"sd15_down_block_remat_{args.topology.replace(':', '-')}_{args.images_per_chip}img.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
