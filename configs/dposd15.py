"""Diffusion-DPO on Stable Diffusion 1.5 (Wallace et al. 2023), the released launch script's defaults.

What it trains: the full SD1.5 UNet on Pick-a-Pic v2 human preference pairs (ties dropped, winner
first: 851,293 pairs over 58,960 prompts). One t and one ε per pair; loss -log σ(-β/2 (Δθ - Δref))
with β = 5000 (the paper's SD1.5 headline used 2000: ``--config.dpo.beta=2000``). AdamW lr 2.048e-5
(1e-8 x 2048 pairs), wd 1e-2, 500 warmup steps of 2000, constant, clip 1.0, 2048 pairs per update
(16 per micro-batch x 128 micro-batches), 512 px resize + center crop + flip, prompt dropout 0.2.

Data: SD1.5 (``model_path``: a hub id or a local diffusers folder) and Pick-a-Pic v2 built with
``python -m jaxpref.data.pickapic --source=yuvalkirstain/pickapic_v2 --data_dir=...``, plus
(recommended) its latent cache ``python -m jaxpref.data.cache ...`` so the step runs no VAE (docs/training.md).
Memory: compiled for a TPU v5e-8 at 4 pairs per chip the step needs 10.3 of 16 GiB per chip, on a v4-8 at 8
pairs per chip 11.6 of 32 GiB (docs/performance.md).
Cost: 2000 x 2048 pairs; the paper used 16 A100s for ~1.5 days. Expected result: implicit-reward
accuracy ~60.8% on Pick-a-Pic validation; beats SD1.5 ~60% of the time on PartiPrompts (docs/methods.md §5).

  python -m jaxpref.train --config=configs/dposd15.py --workdir=/runs/dpo \
      --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib, layouts


def get_config(runtime: str = ""):
    """runtime: '' (a TPU v5e-8, as below) or 'gpu8' (one node of 8 x 80 GB GPUs, one process; jaxpref/layouts.py)."""
    c = config_lib.sd15_base_config("dpo")
    c.batch_size = 2048
    c.grad_accum = 128
    c.total_steps = 2000
    c.optimizer.update(name="adamw", lr=2.048e-5, weight_decay=1e-2, warmup_steps=500, schedule="constant",
                       grad_clip=1.0, decay_steps=2000)
    c.dpo.beta = 5000.0
    c.checkpoint.update(every=200, keep=3)
    c.eval.update(every=500)
    return layouts.for_runtime(c, runtime)
