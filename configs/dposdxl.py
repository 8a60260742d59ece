"""Diffusion-DPO on SDXL base 1.0 (Wallace et al. 2023), the released SDXL launcher's settings.

What it trains: the full SDXL UNet (2.57 B params) on Pick-a-Pic v2 human preference pairs at 1024 px,
conditioned as diffusers' SDXL pipeline (both encoders' penultimate states, pooled projection, time ids).
Sources, all SalesforceAIResearch/DiffusionDPO: ``launchers/sdxl.sh`` gives β = 5000, 2000 updates,
constant lr after 200 warmup steps, lr 1e-8 scaled by the pairs per update (``--scale_lr``) and "Paper
used 2048" pairs per update (1 per GPU x 128 accumulation x 16 GPUs): lr 2.048e-5, and the fp16-fix VAE;
``train.py`` gives, for ``--sdxl``: Adafactor (scale_parameter=False, relative_step=False, clip 1.0,
weight decay 1e-2; our ``optimizer.name="adafactor"`` is that optimizer), gradient checkpointing (remat),
1024 px, prompt dropout 0.2 (a dropped caption is encoded as "", nothing zeroed), center crop and random
flip (``--random_crop`` is off by default; ``--config.data.crop=random`` for ours), grad-norm clip 1.0, and
time ids fixed at (1024, 1024, 0, 0, 1024, 1024) for every image (``data.time_ids="fixed"``;
``"crop"`` feeds each image's recorded size and crop, as diffusers' own SDXL script).
Ours: 1 pair per chip per micro-batch on a 4-chip v5p-8 / v4-8 (2048 pairs = 512 micro-batches x 4);
compiled for TPU (docs/performance.md): 19.5 GiB per chip on a v5p-8, 20.7 GiB on a v4-8: fits.

Data: SDXL base (``model_path``: a hub id or a local diffusers folder), the fp16-fix VAE (``vae_path``, what
the release encodes with; our VAE runs in ``vae_dtype`` fp32 or bf16), Pick-a-Pic v2 at 1024 px
(``python -m jaxpref.data.pickapic ...``) and its latent cache (``python -m jaxpref.data.cache ... --vae
VAE_PATH --resolution 1024``), docs/training.md.
Cost: 2000 x 2048 pairs; the launcher notes ~30 hours per 200 steps on its GPUs. Expected result: the paper's
DPO-SDXL (human preference over SDXL base on PartiPrompts and HPDv2), not reproduced here.

  python -m jaxpref.train --config=configs/dposdxl.py --workdir=/runs/dposdxl \
      --config.model_path=stabilityai/stable-diffusion-xl-base-1.0 --config.vae_path=madebyollin/sdxl-vae-fp16-fix \
      --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sdxl_base_config("dpo")
    c.batch_size = 2048
    c.grad_accum = 512
    c.total_steps = 2000
    c.optimizer.update(name="adafactor", lr=2.048e-5, weight_decay=1e-2, warmup_steps=200, schedule="constant",
                       grad_clip=1.0, decay_steps=2000)
    c.dpo.beta = 5000.0
    c.data.time_ids = "fixed"
    c.checkpoint.update(every=200, keep=3)
    c.eval.update(every=500, sampler="ddim", guidance_scale=5.0)
    return c
