"""Diffusion-DRO on SDXL base 1.0 (Wu et al., NeurIPS 2025): the release's SD1.5 defaults on SDXL.

What it trains: the full SDXL UNet with DRO's ranking hinge, top-500 Pick-a-Pic v2 experts against the
policy's own DPM-Solver++ trajectories (configs/drosd15.py explains the method and the negatives).
Sources, all basiclab/DiffusionDRO: the release publishes no SDXL run (its readme trains SD1.5 only);
``train.py`` has an ``--sdxl`` switch that loads the second encoder, hard-codes the fp16-fix VAE and
records per image the SDXL time ids (original size, crop top-left, target size) from its data loader;
every other number is that script's default, as in configs/drosd15.py: margin 0.001, AdamW lr 1e-4
constant, 256 pairs per update, 25,600 micro-steps / 16 = 1,600 updates, grad-norm clip 1.0, EMA,
prompt dropout 0.2, DPM-Solver++ 20 steps at guidance 1.0, center crop, random flip. Not from the
release: 1024 px (its ``--resolution`` defaults to 512 for SDXL too; SDXL is trained at 1024) and remat
(its gradient checkpointing is off by default; SDXL at 1024 px needs it on 4 chips).
Ours: 1 expert per chip per micro-batch on a 4-chip v5p-8 (256 = 64 micro-batches x 4); per-chip memory is
measured for the DPO config only (docs/performance.md: 19.5 GiB per chip on a v5p-8 at 1 pair per chip).

Data: as configs/drosd15.py (``python -m jaxpref.data.experts ...``) at 1024 px.
Cost: each expert costs ~20 SDXL generation forwards at 1024 px plus one train forward/backward.
Expected result: unpublished for SDXL.

  python -m jaxpref.train --config=configs/drosdxl.py --workdir=/runs/drosdxl \
      --config.model_path=stabilityai/stable-diffusion-xl-base-1.0 --config.vae_path=madebyollin/sdxl-vae-fp16-fix \
      --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sdxl_base_config("dro")
    c.batch_size = 256
    c.grad_accum = 64
    c.total_steps = 1600
    c.optimizer.update(name="adamw", lr=1e-4, weight_decay=1e-2, warmup_steps=0, schedule="constant",
                       grad_clip=1.0, decay_steps=1600)
    c.ema.update(enabled=True, max_decay=0.9999)
    c.dro.update(margin=0.001, sampler="dpm++", num_inference_steps=20, guidance_scale=1.0,
                 buffer_size=16, steps_per_trajectory=1, refresh_every=0, expert_timestep="shared",
                 negative_target="trajectory")
    c.data.time_ids = "crop"
    c.checkpoint.update(every=100, keep=3)
    c.eval.update(every=200, sampler="ddpm", guidance_scale=7.5)
    return c
