"""SmPO-Diffusion on Stable Diffusion 1.5 (Lu et al., ICML 2025), the released code's defaults.

What it trains: the full SD1.5 UNet on Pick-a-Pic v2 pairs ordered by PickScore (human labels only drop
ties), with the smoothed preference p = softmax of min-max-normalised PickScores and γ = 10: the DPO
margin is scaled by γ(2p - 1) per pair. Latents come from a ReNoise inversion with the policy (5-step
DDIM grid, one renoise iteration, two predictions averaged: ``smpo.inversion="code"``, kept as the
default so a run reproduces the released code; "paper" lands exactly on t; "consistent" inverts along a
per-sample grid ending at t with two ReNoise iterations, so latent, timestep and target agree: the
released form lands on the grid level at or above t while the models are told t, docs/methods.md §3)
instead of forward noise. On the embedded world no inversion helped (100 updates, seeds 0-2: none
+0.031, code and consistent below the base model; docs/results.md); unmeasured on SD1.5, where the
paper reports the inversion's gain. β = 2000, AdamW lr 1.024e-5, 100 warmup, wd 1e-2, clip 1.0,
1024 pairs per update, 200 updates. Policy and reference start from an SFT checkpoint (SD1.5 fine-tuned
on preferred images): point ``model_path`` at it (the first command below makes it).

Data: Pick-a-Pic v2 with PickScore rewards (``python -m jaxpref.data.scores --scorer
pickscore:yuvalkirstain/PickScore_v1 ...``, docs/training.md).
Memory: compiled for a TPU v5e-8 at 4 pairs per chip (the inversion inside the step) 9.3 of 16 GiB per chip,
on a v4-8 at 8 pairs per chip 14.3 of 32 GiB (docs/performance.md).
Cost: 200 x 1024 pairs, each with 2 x 5 x 2 no-grad inversion forwards. Expected result (HPDv2 medians):
PickScore 22.08, HPSv2.1 29.31, ImageReward 0.885, Aesthetic 5.831 (docs/methods.md §5).

  python -m jaxpref.train --config=configs/sftsd15.py --workdir=runs/sft --config.data.data_dir=/data/tfds
  python -m jaxpref.train --config=configs/smposd15.py --workdir=runs/smpo --config.model_path=runs/sft/export \
      --config.data.data_dir=/data/tfds --config.data.scores_dir=/data/scores

The SFT run's ``export/`` is a diffusers pipeline folder (its trained UNet, the rest of SD1.5 as loaded): the
policy and, with ``reference_path`` empty, the reference start from it.
"""
from jaxpref import config_lib, layouts


def get_config(runtime: str = ""):
    """runtime: '' (a TPU v5e-8, as below) or 'gpu8' (one node of 8 x 80 GB GPUs, one process; jaxpref/layouts.py)."""
    c = config_lib.sd15_base_config("smpo")
    c.model_path = "runs/sft/export"   # the SFT stage's export (configs/sftsd15.py), a diffusers folder
    c.batch_size = 1024
    c.grad_accum = 64
    c.total_steps = 200
    c.optimizer.update(name="adamw", lr=1.024e-5, weight_decay=1e-2, warmup_steps=100, schedule="constant",
                       grad_clip=1.0, decay_steps=200)
    c.smpo.update(beta=2000.0, gamma=10.0, inversion="code", inversion_steps=5)
    c.checkpoint.update(every=50, keep=3)
    c.eval.update(every=100)
    return layouts.for_runtime(c, runtime)
