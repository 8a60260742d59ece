"""The FLOP model of a train step and its MFU (used by the train loop's perf/mfu and ``benchmarks/bench.py``).

Each method counts its own update (``Method.flops``: F = one UNet forward of one image, G = forward +
backward; e.g. DPO 2B·G + 2B·F on B pairs: the policy's forward and backward and the reference's forward on
the 2B winner/loser latents); ``model_flops("<method> <part>", ...)`` reads it from the registry.
Not counted: the CLIP text encoder (0.013 TFLOP per caption, B per step: < 0.3%), loss and optimizer
elementwise work, and remat's recomputation (MFU counts model FLOPs, not executed ones).

F and G of SD1.5 (``SD15_FWD_FLOPS``, ``SD15_FWDBWD_FLOPS``) were measured on the SD1.5 UNet, batch 1,
64x64 latents, 77 tokens: F = 0.80 TFLOP, G = 2.36 TFLOP per image. Other sizes take them from XLA's
cost analysis of a batch-1 UNet forward and forward+backward.
MFU = model FLOPs / step seconds / the device's dense bf16 peak (``PEAK_TFLOPS``; unknown → None).

XLA's own count of a compiled program (``cost_analysis()['flops']``) counts a while loop's body once,
not × its trip count, and a ``lax.cond`` once; ``loop_corrected`` scales such a count back up.
"""
from __future__ import annotations

from typing import Mapping, Optional

SD15_FWD_FLOPS = 0.80e12     # SD1.5 UNet forward, one image, 64x64 latents, 77 tokens
SD15_FWDBWD_FLOPS = 2.36e12  # forward + backward

# Dense bf16 peak TFLOP/s per device, matched by substring of ``device_kind``, first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v4", 275.0),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def mfu(flops: Optional[float], seconds: float, device_kind: str) -> Optional[float]:
    """Model FLOPs utilisation: flops / seconds / peak; None when the peak or the count is unknown."""
    peak = peak_flops(device_kind)
    if peak is None or flops is None or not seconds > 0:
        return None
    return flops / seconds / peak


def model_flops(workload: str, pairs: int, fwd: float, fwdbwd: float, config=None) -> float:
    """FLOPs of ``workload`` ("<objective> <part>": "dpo step", "dro generation", ...) on ``pairs`` pairs, by
    the method's own model (``Method.flops``) under ``config`` (default: base_config() with that objective)."""
    from jaxpref import config_lib
    from jaxpref.methods import get_method

    name, _, part = workload.partition(" ")
    method = get_method(name)
    if config is None:
        config = config_lib.base_config()
        config.objective = name
    parts = method.flops(config, pairs, fwd, fwdbwd)
    if part not in parts:
        raise ValueError(f"workload {workload!r}: {name} counts {sorted(parts)}")
    return float(parts[part])


def unet_flops(eps, unet_params, latent_shape, text_shape) -> tuple[float, float] | None:
    """XLA's count of one image's UNet forward and forward+backward (F, G) at the run's shapes, from the
    lowered (pre-optimisation) programs: no compile (within 0.1% of the compiled count for the UNet, whose
    FLOPs are convolutions and matmuls). ``eps(params, x, t, text)``: the UNet call, e.g. a method's
    ``eps`` as training feeds it (SDXL's pytree conditioning included); ``unet_params`` may be
    ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, *latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    text = jax.tree_util.tree_map(lambda s: jnp.zeros((1, *s), jnp.float32), text_shape,
                                  is_leaf=lambda s: isinstance(s, tuple))
    fwd = lambda p: eps(p, x, t, text)  # noqa: E731
    loss = lambda p: jnp.mean(jnp.square(fwd(p)))  # noqa: E731
    f = xla_flops(jax.jit(fwd).lower(unet_params))
    g = xla_flops(jax.jit(jax.value_and_grad(loss)).lower(unet_params))
    return (f, g) if f and g else None


def xla_flops(program) -> float | None:
    """XLA's FLOP count of a compiled (or lowered) program; None when XLA reports none."""
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    value = float(cost.get("flops", 0.0)) if cost else 0.0
    return value if value > 0 else None


def loop_corrected(raw: float, body: float, trips: int, model: Optional[float]) -> tuple[float, bool]:
    """XLA's count of a program with one ``trips``-long loop whose body XLA counted once.

    raw: the program's count; body: the loop body's count; model: the model count of the whole loop.
    When raw already covers most of the model (XLA unrolled the loop) nothing is added.
    Returns (count, corrected?).
    """
    if model is not None and raw >= 0.5 * model:
        return raw, False
    return raw + (trips - 1) * body, True


# ---------------------------------------------------------------------------------------------
# Evaluation: generating and scoring images (docs/evaluation.md).

SD_VAE_DECODE_FLOPS = 2.50e12   # SD's VAE decoder, one 512 px image (64x64 latents)
# One (image, caption) pair through a reward model at 224 px, image and text towers (the aesthetic head
# reads the image tower only). XLA's count of our modules, batch 1: CLIP ViT-H/14 (PickScore, HPSv2),
# CLIP ViT-L/14 (CLIP score on openai/clip-vit-large-patch14, aesthetic), BLIP ViT-L/16 + BERT-base with
# cross-attention (ImageReward).
CLIP_VIT_H_FLOPS = 0.385e12
SCORER_FLOPS = {"pickscore": CLIP_VIT_H_FLOPS, "hpsv2": CLIP_VIT_H_FLOPS, "clipscore": 0.176e12,
                "aesthetic": 0.162e12, "imagereward": 0.139e12, "shapes": 0.0}


def evaluation_flops(num_images: int, num_steps: int, guidance_scale: float, scorers, *,
                     fwd: float = SD15_FWD_FLOPS, decode: float = SD_VAE_DECODE_FLOPS,
                     scorer_flops: Mapping[str, float] | None = None) -> float:
    """FLOPs of generating ``num_images`` images (``num_steps`` UNet evaluations each, two with CFG, and one
    VAE decode) and scoring each with every reward in ``scorers`` (``scorer_flops`` replaces a scorer's count
    where its model differs, e.g. a CLIP score on ViT-H/14). Not counted: the text encoder, once per prompt
    (0.013 TFLOP), and the samplers' elementwise updates."""
    counts = {**SCORER_FLOPS, **(scorer_flops or {})}
    unknown = [s for s in scorers if s not in counts]
    if unknown:
        raise ValueError(f"scorers {unknown}: no FLOP count; known {sorted(counts)}")
    per_image = num_steps * fwd * (2 if guidance_scale != 1.0 else 1) + decode + sum(counts[s] for s in scorers)
    return float(num_images * per_image)
