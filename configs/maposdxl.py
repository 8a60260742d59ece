"""MaPO on SDXL base 1.0 (Hong et al., 2024), the released code's settings: no reference model.

What it trains: the full SDXL UNet on Pick-a-Pic v2 preference pairs (ties dropped, winner first) with MaPO's
loss: the winner's denoising error plus β times a log-sigmoid margin on the pair's scores s·e / (exp(s·e) − 1),
scaled by T = 1000 (docs/methods.md §8). No frozen reference is kept (the method declares it), so the run
holds one UNet where DPO holds two.

Sources, all mapo-t2i/mapo: the README's training command (shown for one GPU, and with ``--multi_gpu`` for
the node of 8 H100s the README says the experiments ran on): 8 pairs per GPU, 2 accumulation steps (128 pairs
per update on 8 GPUs), lr 1e-5 constant, no warmup, 2000 updates, 8-bit Adam, fp16 with the fp16-fix VAE,
gradient checkpointing; ``args.py`` gives β = 0.1
(``--beta_mapo``), s = 0.5 (``--snr_value``), AdamW β (0.9, 0.999), ε 1e-8, weight decay 1e-2, clip 1.0,
1024 px, center crop and random flip, ties removed; ``utils.py`` encodes every caption as given (no prompt
dropout) and feeds the time ids of each pair's original size and crop (``data.time_ids="crop"``).
Where ours differs: AdamW with fp32 moments (the release: bitsandbytes' 8-bit AdamW) in bf16 compute (the
release: fp16); our loader records each image's own size and crop, the release gives both images of a pair
the first image's.
Ours: 8 pairs per micro-batch, 16 micro-batches: one pair per device on 8 devices (the paper's 8 GPUs) or two
per chip on a v5p-8's 4 chips; params and AdamW state split over every device (fsdp), remat on.
Per-chip memory unmeasured (docs/performance.md has DPO-SDXL's, which also holds the reference).

Data: as configs/dposdxl.py (docs/training.md). Cost: 2000 x 128 pairs, each two SDXL forward+backward and
no reference forward. Expected result: the paper's MaPO-SDXL on Pick-a-Pic v2 (above SDXL and Diffusion-DPO
in its evaluation), not reproduced here.

  python -m jaxpref.train --config=configs/maposdxl.py --workdir=/runs/maposdxl \
      --config.model_path=stabilityai/stable-diffusion-xl-base-1.0 --config.vae_path=madebyollin/sdxl-vae-fp16-fix \
      --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sdxl_base_config("mapo")
    c.batch_size = 128
    c.grad_accum = 16
    c.total_steps = 2000
    c.prompt_dropout = 0.0
    c.optimizer.update(name="adamw", lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, warmup_steps=0,
                       schedule="constant", grad_clip=1.0, decay_steps=2000)
    c.mapo.update(beta=0.1, snr_value=0.5)
    c.data.time_ids = "crop"
    c.checkpoint.update(every=500, keep=3)
    c.eval.update(every=500, sampler="ddim", guidance_scale=5.0)
    return c
