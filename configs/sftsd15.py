"""SFT of Stable Diffusion 1.5 on the preferred Pick-a-Pic v2 images: the first stage of the SmPO recipe.

What it trains: the full SD1.5 UNet with the plain denoising loss (ε-prediction MSE, forward noise) on the
human-preferred image of each Pick-a-Pic v2 pair (ties dropped), its caption dropped to "" with probability
0.2; no reference model enters the loss (docs/methods.md §6). Its export is where configs/smposd15.py starts
policy and reference.

Sources (JaydenLyh/SmPO): ``train.py``'s ``--sft`` mode picks the preferred image by the human label
(``label_0``), drops ties and takes ``F.mse_loss`` of the prediction; its defaults give AdamW β (0.9, 0.999),
ε 1e-8, weight decay 1e-2, clip 1.0, prompt dropout 0.2, 512 px resize + center crop + flip, a posterior
sample per step; ``examples/sd15.sh`` gives the schedule used here: 8 GPUs x 1 x 128 accumulation = 1024
images per update, ``--learning_rate=1e-8 --scale_lr`` = 1.024e-5, constant after 100 warmup steps,
200 updates, fp16 (bf16 here). That launcher is the SmPO stage's (it loads ``checkpoints/sd15-sft``); the
repository has no SFT launcher, so this file gives the SFT stage the launcher's schedule
(``--config.total_steps`` to train longer). In the released ``--sft`` mode the SmPO inversion loop also runs
before the loss, with the inverse scheduler's steps set for the SmPO mode only; SFT here is the plain
forward-noise denoising loss (Diffusion-DPO's ``--sft``, which SmPO's train.py adapts).

Data: SD1.5 by hub id (resolved into the Hugging Face cache) and Pick-a-Pic v2 built with
``python -m jaxpref.data.pickapic --source=yuvalkirstain/pickapic_v2 --data_dir=...``
(docs/training.md); no reward scores needed. Cost: 200 x 1024 images, each one UNet forward and backward
(half a DPO pair's policy work, no reference forward). Unmeasured on SD1.5.

  python -m jaxpref.train --config=configs/sftsd15.py --workdir=/runs/sft --config.data.data_dir=/data/tfds
  python -m jaxpref.export --checkpoint=/runs/sft --base=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --out=/models/sd15-sft

then SmPO from ``/models/sd15-sft`` (configs/smposd15.py).
"""
from jaxpref import config_lib, layouts


def get_config(runtime: str = ""):
    """runtime: '' (a TPU v5e-8, as below) or 'gpu8' (one node of 8 x 80 GB GPUs, one process; jaxpref/layouts.py)."""
    c = config_lib.sd15_base_config("sft")
    # The layout of configs/smposd15.py (a TPU v5e-8: fsdp over every chip, remat, 16 pairs per micro-batch);
    # SFT's step does less per pair (one image, no reference forward), so it fits where SmPO's does.
    c.batch_size = 1024
    c.grad_accum = 64
    c.total_steps = 200
    c.prompt_dropout = 0.2
    c.optimizer.update(name="adamw", lr=1.024e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, warmup_steps=100,
                       schedule="constant", grad_clip=1.0, decay_steps=200)
    c.checkpoint.update(every=50, keep=3)
    c.eval.update(every=100)
    return layouts.for_runtime(c, runtime)
