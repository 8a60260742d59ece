"""Times our Flax UNet (forward, forward+backward) and optionally diffusers' PyTorch UNet at the same size.

  python benchmarks/bench_unet.py --size tiny                     # CPU, seconds: checks the script works
  python benchmarks/bench_unet.py --size sd15 --batch 8 --torch   # GPU: bf16, 64x64 latents

Params are random (timings do not depend on the values). jit compile and warm-up calls are excluded;
each row is the median of ``--iters`` timed calls. TFLOP/s counts 0.80 TFLOP per SD1.5 image forward at
64x64 (3x that for forward+backward); other sizes use XLA's own FLOP count of the forward program.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models.presets import BENCH_TINY_UNET, SD15_UNET, SDXL_UNET
from jaxpref.models.unet import count_params, unet_from_config, unet_param_shapes

TINY_CONFIG = {**BENCH_TINY_UNET, "sample_size": 16}
SIZES = {"tiny": (TINY_CONFIG, 8), "sd15": (SD15_UNET, 77), "sdxl": (SDXL_UNET, 77)}
SD15_FWD_FLOPS_64 = 0.80e12  # per image, 64x64 latents


def make_inputs(config, batch, side, seq, seed=0):
    """Random numpy inputs in NHWC (ours); torch gets the NCHW transpose."""
    rng = np.random.default_rng(seed)
    inputs = dict(latents=rng.standard_normal((batch, side, side, config.get("in_channels", 4)), dtype=np.float32),
                  timesteps=rng.integers(0, 1000, (batch,)).astype(np.int32),
                  context=rng.standard_normal((batch, seq, config["cross_attention_dim"]), dtype=np.float32),
                  added=None)
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added"] = {"text_embeds": rng.standard_normal((batch, text_dim), dtype=np.float32),
                           "time_ids": np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1))}
    return inputs


def time_calls(fn, iters, warmup=2):
    """Median seconds of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(config, inputs, dtype, iters, remat, attention_impl):
    module = unet_from_config(config, dtype=dtype, remat=remat, attention_impl=attention_impl)
    args = (jnp.asarray(inputs["latents"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["context"]),
            None if inputs["added"] is None else {k: jnp.asarray(v) for k, v in inputs["added"].items()})
    # Random params straight from the shapes: no compile of the init program.
    shapes = unet_param_shapes(module)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(shapes))))
    params = jax.tree_util.tree_map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    print(f"jax: {count_params(params):,} params, compute {jnp.dtype(dtype).name}, remat={remat}, "
          f"attention={attention_impl or 'xla'}, device {jax.devices()[0].device_kind}")

    forward = jax.jit(lambda p: module.apply({"params": p}, *args))
    target = jnp.zeros(args[0].shape, jnp.float32)
    loss = lambda p: jnp.mean((module.apply({"params": p}, *args) - target) ** 2)  # noqa: E731
    train = jax.jit(jax.value_and_grad(loss))
    fwd_compiled = forward.lower(params).compile()
    cost = fwd_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    t_fwd = time_calls(lambda: jax.block_until_ready(forward(params)), iters)
    t_train = time_calls(lambda: jax.block_until_ready(train(params)), iters)
    return {"forward": t_fwd, "forward+backward": t_train}, xla_flops


def bench_torch(config, inputs, dtype, iters):
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    model = diffusers.UNet2DConditionModel(**config).to(device=device, dtype=tdtype)
    print(f"torch: diffusers {diffusers.__version__}, torch {torch.__version__}, {device}, {tdtype}")
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    kwargs = dict(sample=to(inputs["latents"].transpose(0, 3, 1, 2)).to(tdtype), timestep=to(inputs["timesteps"]),
                  encoder_hidden_states=to(inputs["context"]).to(tdtype),
                  added_cond_kwargs=None if inputs["added"] is None else
                  {k: to(v).to(tdtype) for k, v in inputs["added"].items()})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(**kwargs)
        sync()

    def train():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs).sample
        (out.float() ** 2).mean().backward()
        sync()

    return {"forward": time_calls(forward, iters), "forward+backward": time_calls(train, iters)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--res", type=int, default=None, help="latent side (default: the config's sample_size)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: fp32 on CPU, bf16 else")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", choices=["xla", "cudnn"], default=None)
    parser.add_argument("--torch", action="store_true", help="also time diffusers' PyTorch UNet")
    args = parser.parse_args()

    config, seq = SIZES[args.size]
    side = args.res or config["sample_size"]
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, None: jnp.float32 if on_cpu else jnp.bfloat16}[args.dtype]
    inputs = make_inputs(config, args.batch, side, seq)

    rows = []
    jax_times, xla_flops = bench_jax(config, inputs, dtype, args.iters, args.remat, args.attention)
    rows += [("jax", k, v) for k, v in jax_times.items()]
    if args.torch:
        rows += [("torch", k, v) for k, v in bench_torch(config, inputs, dtype, args.iters).items()]

    if args.size == "sd15":
        fwd_flops = SD15_FWD_FLOPS_64 * (side / 64) ** 2 * args.batch
    else:
        fwd_flops = xla_flops
    print(f"\n{args.size}: batch {args.batch}, latents {side}x{side}, {jnp.dtype(dtype).name}, "
          f"forward {fwd_flops / args.batch / 1e12:.4f} TFLOP/image")
    print(f"{'impl':<6} {'pass':<17} {'ms':>9} {'img/s':>9} {'TFLOP/s':>9}")
    for impl, name, seconds in rows:
        flops = fwd_flops * (3 if name == "forward+backward" else 1)
        print(f"{impl:<6} {name:<17} {seconds * 1e3:>9.2f} {args.batch / seconds:>9.1f} {flops / seconds / 1e12:>9.3f}")


if __name__ == "__main__":
    main()
