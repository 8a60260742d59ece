"""The FLOP model and MFU of ``jaxpref.flops`` against hand computations, and the correction of XLA's
once-per-loop count."""
import pytest

from jaxpref import config_lib, flops


def _config(objective, **overrides):
    c = config_lib.base_config()
    c.objective = objective
    return config_lib.apply_overrides(c, overrides)


def test_model_flops_and_mfu_by_hand():
    F, G = 0.80e12, 2.36e12  # measured on the SD1.5 UNet, batch 1, 64x64 latents, 77 tokens
    assert (flops.SD15_FWD_FLOPS, flops.SD15_FWDBWD_FLOPS) == (F, G)
    # DPO, 8 pairs: policy fwd+bwd on 16 latents + reference fwd on 16.
    dpo = 16 * 2.36e12 + 16 * 0.80e12
    assert flops.model_flops("dpo step", 8, F, G) == pytest.approx(dpo)
    assert dpo == pytest.approx(50.56e12)
    # DRO: the same update on 8 experts + 8 negatives, plus 20 DPM++ forwards for each of 8 trajectories.
    assert flops.model_flops("dro generation", 8, F, G) == pytest.approx(20 * 8 * 0.80e12)
    assert flops.model_flops("dro step", 8, F, G) == pytest.approx(dpo + 128e12)
    assert flops.model_flops("dro step", 8, F, G, _config("dro", **{"dro.steps_per_trajectory": 4})) == pytest.approx(dpo + 32e12)
    assert flops.model_flops("dro generation", 8, F, G, _config("dro", **{"dro.guidance_scale": 7.5})) == pytest.approx(2 * 128e12)
    # SmPO: 5 inversion steps x 2 ReNoise predictions on the 16 latents ("paper" mode runs one more step).
    # SmPO: 2 ReNoise predictions on the 16 latents per inversion step the batch runs: step j runs unless all 8
    # pairs' t (uniform over 0..999) are at or below its level ("code": sources -199, 1, 201, 401, 601; "paper"
    # one more step, its first always, then t above the targets 1, ..., 801).
    def runs(levels):
        return sum(1 - (min(level + 1, 1000) / 1000) ** 8 if level >= 0 else 1.0 for level in levels)
    assert flops.model_flops("smpo inversion", 8, F, G) == pytest.approx(2 * 16 * 0.8e12 * runs([-199, 1, 201, 401, 601]))
    assert runs([-199, 1, 201, 401, 601]) == pytest.approx(4.982, abs=1e-3)   # not 5: all 8 t <= 601 in 1.7 %
    assert flops.model_flops("smpo step", 8, F, G, _config("smpo", **{"smpo.inversion": "paper"})) == pytest.approx(
        dpo + 2 * 16 * 0.8e12 * runs([-1, 1, 201, 401, 601, 801]))
    assert flops.model_flops("smpo step", 8, F, G, _config("smpo", **{"smpo.inversion": "none"})) == pytest.approx(dpo)  # as DPO

    # MFU = flops / seconds / peak; H100 SXM 989 TFLOP/s dense bf16.
    assert flops.mfu(dpo, 0.1, "NVIDIA H100 80GB HBM3") == pytest.approx(505.6 / 989)
    assert flops.mfu(dpo, 0.1, "NVIDIA H200") == pytest.approx(505.6 / 989)
    assert flops.mfu(dpo, 0.1, "NVIDIA A100-SXM4-80GB") == pytest.approx(505.6 / 312)
    assert flops.mfu(dpo, 0.1, "TPU v5 lite") == pytest.approx(505.6 / 197)
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.mfu(dpo, 0.1, "cpu") is None
    assert flops.mfu(None, 0.1, "NVIDIA H100 80GB HBM3") is None


def test_loop_correction():
    # XLA counted a 20-step loop's body once: scale it to 20 bodies.
    assert flops.loop_corrected(10.0, 10.0, 20, 200.0) == (200.0, True)
    # A step holding that loop: add the 19 bodies XLA left out.
    assert flops.loop_corrected(50.0, 10.0, 20, 240.0) == (240.0, True)
    # XLA unrolled the loop (its count already covers the model's): unchanged.
    assert flops.loop_corrected(190.0, 10.0, 20, 200.0) == (190.0, False)
