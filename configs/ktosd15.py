"""Diffusion-KTO on Stable Diffusion 1.5 (Li et al., NeurIPS 2024), the released code's settings.

What it trains: the full SD1.5 UNet on Pick-a-Pic v2 images with per-image binary labels: each pair's chosen
image desirable, its rejected image undesirable, every image with its own t, ε and prompt dropout; loss
mean λ_y (1 − σ(y β (g − z))) with g the image's log-likelihood ratio against the frozen reference and z the
micro-batch's mean g clipped at 0 (docs/methods.md §7).

Sources. The paper: SD1.5 on 4 GPUs, 2 images per GPU, Adam. jacklishufan/diffusion-kto, ``exps/example.sh``
(the released launcher): lr 1e-7 constant after 200 warmup steps, 20,000 updates, 2 images per GPU on 4
processes, no accumulation, fp16 (bf16 here), gradient checkpointing, 512 px, 8-bit AdamW, the sigmoid value
(``--halo sigmoid``), ``--loss kto``; ``train_kto_sd_v1.5.py``'s defaults for what the launcher leaves unset:
β = 1000 (``--beta_dpo``), λ_D = λ_U = 1, the reference point of ``--bce_offset none`` (the batch mean of g
over all processes, clamped at 0, detached), AdamW β (0.9, 0.999), weight decay 1e-2, clip 1.0, prompt
dropout 0.2 per image, center crop and random flip, the reference frozen (no EMA of it, no EMA of the policy).
Where ours differs: 8 pairs (16 images) per update against the release's 8 images, the smallest batch that
splits over a v5e-8's chips (``--config.batch_size=4`` on 4 chips or fewer reproduces it); images come as
Pick-a-Pic pairs, so a batch is half desirable, while the release samples desirable images with probability
0.8 (``--positive_ratio 0.8``) and labels an image that won any of its pairs desirable (``--policy
gt_label_wi_l``; 237,530 desirable and 690,538 undesirable images in the paper).
``--config.kto.lambda_desirable=1.6 --config.kto.lambda_undesirable=0.4`` gives the release's 4:1 weighting
in expectation, while the reference point z still averages a 1:1 batch. The optimizer keeps fp32 AdamW
moments (the release: 8-bit AdamW), and one horizontal flip serves both images of a pair (the release flips
each image on its own). Precision: params and updates are fp32, the forwards run in bf16 (the release: fp16).
At lr 1e-7 most weights' bf16 values change only after many updates (bf16 keeps 3 fewer mantissa bits than
fp16), so g is a coarser signal early in the run; ``--config.dtype=float32 --config.reference_dtype=float32``
removes that rounding, with fp32 forwards.

Data: SD1.5 (hub id or local folder) and Pick-a-Pic v2 as for configs/dposd15.py (docs/training.md). Cost: per
pair two policy forward+backward and two reference forwards, as DPO. Expected result: the paper's
Diffusion-KTO-SD1.5 (PickScore and ImageReward above Diffusion-DPO's), not reproduced here.

  python -m jaxpref.train --config=configs/ktosd15.py --workdir=/runs/kto --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sd15_base_config("kto")
    # Sized for a TPU v5e-8 as configs/dposd15.py (fsdp over every chip, remat), one pair per chip.
    c.batch_size = 8
    c.grad_accum = 1
    c.total_steps = 20000
    c.prompt_dropout = 0.2
    c.optimizer.update(name="adamw", lr=1e-7, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, warmup_steps=200,
                       schedule="constant", grad_clip=1.0, decay_steps=20000)
    c.kto.update(beta=1000.0, lambda_desirable=1.0, lambda_undesirable=1.0)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(every=2000)
    return c
