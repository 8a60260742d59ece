"""SmPO-Diffusion on SDXL base 1.0 (Lu et al., ICML 2025), the released SDXL launcher's settings.

What it trains: the full SDXL UNet on Pick-a-Pic v2 pairs ordered by PickScore with the smoothed
preference (γ(2p - 1) scaling of the DPO margin), on latents inverted with the policy (ReNoise, the
released code's form ``smpo.inversion="code"``) over an N = 10 step grid instead of SD1.5's 5.
Sources, all JaydenLyh/SmPO: ``examples/sdxl.sh`` gives β = 5000, 200 updates, constant lr after 100
warmup steps, lr 1e-8 scaled by the pairs per update (1 per GPU x 128 accumulation x 8 GPUs = 1024):
1.024e-5, fp16 and the fp16-fix VAE, SDXL base itself as the starting point (no SFT checkpoint);
``train.py`` gives, for ``--sdxl``: 10 inversion steps (``inverse_scheduler.set_timesteps(10)``; 5 for
SD1.5), Adafactor (scale_parameter=False, relative_step=False, clip 1.0, weight decay 1e-2), gradient
checkpointing, γ = 10 (hard-coded in the loss), 1024 px, prompt dropout 0.2 ("" encoded), center crop,
grad-norm clip 1.0, time ids fixed at (1024, 1024, 0, 0, 1024, 1024) (``data.time_ids="fixed"``).
Ours: 1 pair per chip per micro-batch on a 4-chip v5p-8 (1024 = 256 micro-batches x 4); per-chip memory is
measured for the DPO config only (docs/performance.md: 19.5 GiB per chip on a v5p-8 at 1 pair per chip).

Data: as configs/dposdxl.py plus PickScore rewards (``python -m jaxpref.data.scores ...``, docs/training.md).
Cost: 200 x 1024 pairs, each with 2 x 10 x 2 no-grad SDXL inversion forwards before its train step.
Expected result: the paper's SmPO-SDXL (reward scores above DPO-SDXL's), not reproduced here.

  python -m jaxpref.train --config=configs/smposdxl.py --workdir=/runs/smposdxl \
      --config.model_path=stabilityai/stable-diffusion-xl-base-1.0 --config.vae_path=madebyollin/sdxl-vae-fp16-fix \
      --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sdxl_base_config("smpo")
    c.batch_size = 1024
    c.grad_accum = 256
    c.total_steps = 200
    c.optimizer.update(name="adafactor", lr=1.024e-5, weight_decay=1e-2, warmup_steps=100, schedule="constant",
                       grad_clip=1.0, decay_steps=200)
    c.smpo.update(beta=5000.0, gamma=10.0, inversion="code", inversion_steps=10)
    c.data.time_ids = "fixed"
    c.checkpoint.update(every=50, keep=3)
    c.eval.update(every=100, sampler="ddim", guidance_scale=5.0)
    return c
