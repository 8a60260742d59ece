"""Throughput of the diffusion core: DDIM-50 with CFG, DPM-Solver++-20 (DRO negatives) and SmPO's inversion.

Each workload is one jitted program (the lax.scan over steps); the table reports compile time, the
steady-state seconds per call (median of --repeats) and images per second. The model is pluggable:

  # CPU smoke run: a tiny stand-in conv net as eps_fn (default)
  python benchmarks/bench_sampling.py
  # GPU: the real SD1.5 UNet architecture (random weights; speed does not depend on them), bf16 compute
  python benchmarks/bench_sampling.py --unet-config sd15 --batch 8 --latent-size 64 --dtype bfloat16
  # a diffusers unet/ folder with its weights
  python benchmarks/bench_sampling.py --unet-folder /path/to/sd15/unet --batch 8 --latent-size 64

"forwards/img" counts model evaluations per image (CFG doubles the batch; SmPO's code-form inversion
makes two per grid step below t, 5 on average for uniform t, but the masked fixed-length scan computes
all 10 unless every sample of the batch is done).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.diffusion import NoiseSchedule, dro_timestep_grid, sample, smpo_invert
from jaxpref.models.presets import BENCH_TINY_UNET, SD15_SCHEDULER, SD15_UNET


# ---------------------------------------------------------------------------------------------
# Models: (eps_apply(params, x, t, cond), params, cond_shape).

def tiny_conv_model(rng, channels: int = 4, width: int = 64, cond_dim: int = 32):
    """A 3-layer conv net with a sinusoidal time embedding and a pooled-text bias: a CPU stand-in."""
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    init = lambda k, shape: jax.random.normal(k, shape, jnp.float32) / np.sqrt(np.prod(shape[:-1]))
    params = {"w1": init(k1, (3, 3, channels, width)), "w2": init(k2, (3, 3, width, width)),
              "w3": init(k3, (3, 3, width, channels)), "cond": init(k4, (cond_dim, width))}

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def apply(p, x, t, cond):
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(width // 2) / (width // 2))
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        temb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
        h = jax.nn.silu(conv(x, p["w1"]) + (temb + cond.mean(axis=1) @ p["cond"])[:, None, None, :])
        h = jax.nn.silu(conv(h, p["w2"]))
        return conv(h, p["w3"])

    return apply, params, (77, cond_dim)


def unet_model(rng, args):
    """Our Flax UNet (jaxpref.models, imported lazily) from a config or a diffusers folder."""
    from jaxpref.models import unet as unet_lib  # noqa: WPS433 (optional dependency of this script)

    dtype = jnp.dtype(args.dtype)
    if args.unet_folder:
        module, params = unet_lib.load_unet(args.unet_folder, dtype=dtype)
    else:
        if args.unet_config == "sd15":
            config = SD15_UNET
        elif args.unet_config == "tiny":
            config = BENCH_TINY_UNET
        else:
            with open(args.unet_config) as f:
                config = json.load(f)
        module = unet_lib.unet_from_config(config, dtype=dtype)
        params = None
    cond_shape = (77, module.cross_attention_dim)
    if params is None:
        x = jnp.zeros((1, args.latent_size, args.latent_size, module.in_channels), jnp.float32)
        params = jax.jit(module.init)(rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, *cond_shape)))["params"]

    def apply(p, x, t, cond):
        return module.apply({"params": p}, x, t, cond).astype(jnp.float32)

    return apply, params, cond_shape


# ---------------------------------------------------------------------------------------------
# Workloads: name -> (jitted fn(params, x, cond, uncond, rng), forwards per image).

def workloads(apply, schedule: NoiseSchedule):
    def ddim_cfg(params, x, cond, uncond, rng):
        eps_fn = lambda x, t, c: apply(params, x, t, c)
        return sample(eps_fn, x, schedule, sampler="ddim", num_steps=50, guidance_scale=7.5, cond=cond,
                      uncond=uncond)

    def dpm_dro(params, x, cond, uncond, rng):
        eps_fn = lambda x, t, c: apply(params, x, t, c)
        grid = dro_timestep_grid(rng, x.shape[0], 20, schedule.num_train_timesteps)
        return sample(eps_fn, x, schedule, sampler="dpm++", num_steps=20, cond=cond, timesteps=grid,
                      return_trajectory=True)

    def smpo(params, x, cond, uncond, rng):
        eps_fn = lambda x, t, c: apply(params, x, t, c)
        t = jax.random.randint(rng, (x.shape[0],), 0, schedule.num_train_timesteps)
        return smpo_invert(eps_fn, x, t, schedule, cond=cond)

    return {"DDIM-50, CFG 7.5": (jax.jit(ddim_cfg), 100),
            "DPM++-20 + trajectory": (jax.jit(dpm_dro), 20),
            "SmPO 5-step inversion": (jax.jit(smpo), 10)}


def time_call(fn, *args, repeats: int):
    """(compile+first-call seconds, median steady-state seconds per call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent-size", type=int, default=16, help="latent height = width (SD1.5 at 512 px: 64)")
    parser.add_argument("--unet-config", default=None, help="'sd15', 'tiny' or a unet config.json path")
    parser.add_argument("--unet-folder", default=None, help="a diffusers unet/ folder (config + weights)")
    parser.add_argument("--dtype", default="float32", help="UNet compute dtype (float32, bfloat16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="run only workloads whose name contains this")
    args = parser.parse_args(argv)

    rng = jax.random.key(0)
    k_model, k_x, k_c, k_u, k_run = jax.random.split(rng, 5)
    if args.unet_config or args.unet_folder:
        apply, params, cond_shape = unet_model(k_model, args)
        model_name = f"UNet ({args.unet_folder or args.unet_config}, {args.dtype})"
    else:
        apply, params, cond_shape = tiny_conv_model(k_model)
        model_name = "tiny conv stand-in"
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    b, s = args.batch, args.latent_size
    x = jax.random.normal(k_x, (b, s, s, 4), jnp.float32)
    cond = jax.random.normal(k_c, (b, *cond_shape), jnp.float32)
    uncond = jax.random.normal(k_u, (b, *cond_shape), jnp.float32)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model: {model_name}, "
          f"batch {b}, latents {s}x{s}x4")
    header = f"{'workload':<24} {'forwards/img':>12} {'compile+1st s':>14} {'s/call':>9} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    for name, (fn, forwards) in workloads(apply, schedule).items():
        if args.only and args.only not in name:
            continue
        first, per_call = time_call(fn, params, x, cond, uncond, k_run, repeats=args.repeats)
        print(f"{name:<24} {forwards:>12} {first:>14.2f} {per_call:>9.4f} {b / per_call:>9.2f}")


if __name__ == "__main__":
    main()
