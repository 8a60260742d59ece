"""The FLOP model of a train step and its MFU (used by ``benchmarks/bench.py``).

Per step of B pairs (F = one UNet forward of one image, G = forward + backward):
  DPO         2B·G + 2B·F                policy fwd+bwd and reference fwd on the 2B winner/loser latents
  DRO update  2B·G + 2B·F                the same on B experts + B negatives
  DRO gen     K·(B/spt)·F·c              DPM++ K = 20 forwards per trajectory, one trajectory per
                                         ``dro.steps_per_trajectory`` (spt) pairs; c = 2 with CFG, else 1
  DRO step    DRO update + DRO gen
  SmPO inv    2·S·2B·F                   S scan steps × 2 ReNoise predictions × the 2B images (= 2·2·S
                                         forwards per pair); S = smpo.inversion_steps ("code"), +1 ("paper").
                                         The masked scan computes a step unless every sample is past it,
                                         so this counts what runs, not the ~7.6 forwards/image that
                                         uniform t needs.
  SmPO step   DPO + SmPO inv
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

from typing import Optional

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


def inversion_scan_steps(steps: int, mode: str) -> int:
    """Steps of SmPO's inversion scan: one per grid source ("code"), one more to reach t > top ("paper"),
    none without inversion ("none": forward noise, as DPO)."""
    if mode == "none":
        return 0
    return steps + (1 if mode == "paper" else 0)


def model_flops(workload: str, pairs: int, fwd: float, fwdbwd: float, *, gen_steps: int = 20,
                steps_per_trajectory: int = 1, guidance_scale: float = 1.0, inversion_steps: int = 5,
                inversion_mode: str = "code") -> float:
    """FLOPs of one call of ``workload`` on ``pairs`` pairs by the model in the module docstring."""
    update = 2 * pairs * fwdbwd + 2 * pairs * fwd
    gen = gen_steps * (pairs // steps_per_trajectory) * fwd * (2 if guidance_scale != 1.0 else 1)
    inv = 2 * inversion_scan_steps(inversion_steps, inversion_mode) * 2 * pairs * fwd
    table = {"dpo step": update, "dro update": update, "dro generation": gen, "dro step": update + gen,
             "smpo inversion": inv, "smpo step": update + inv}
    if workload not in table:
        raise ValueError(f"workload {workload!r}: known {sorted(table)}")
    return float(table[workload])


def loop_corrected(raw: float, body: float, trips: int, model: Optional[float]) -> tuple[float, bool]:
    """XLA's count of a program with one ``trips``-long loop whose body XLA counted once.

    raw: the program's count; body: the loop body's count; model: the model count of the whole loop.
    When raw already covers most of the model (XLA unrolled the loop) nothing is added.
    Returns (count, corrected?).
    """
    if model is not None and raw >= 0.5 * model:
        return raw, False
    return raw + (trips - 1) * body, True
