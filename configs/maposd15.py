"""MaPO on Stable Diffusion 1.5 (Hong et al., 2024): the released SDXL recipe at 512 px, no reference model.

What it trains: the full SD1.5 UNet on Pick-a-Pic v2 preference pairs (ties dropped, winner first) with MaPO's
loss, the winner's denoising error plus β times a log-sigmoid margin on the pair's scores (docs/methods.md §8);
no frozen reference is kept.

Sources: mapo-t2i/mapo releases an SDXL trainer only; this file keeps its recipe (configs/maposdxl.py: β = 0.1,
s = 0.5, lr 1e-5 constant without warmup, AdamW weight decay 1e-2, clip 1.0, 128 pairs per update, 2000
updates, no prompt dropout, center crop and random flip) and changes the model and the resolution (512 px):
a choice of ours, not a published setting.

Data: SD1.5 (hub id or local folder) and Pick-a-Pic v2 as for configs/dposd15.py (docs/training.md). Cost:
2000 x 128 pairs, each two SD1.5 forward+backward, no reference forward. Unmeasured on SD1.5.

  python -m jaxpref.train --config=configs/maposd15.py --workdir=/runs/mapo --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib, layouts


def get_config(runtime: str = ""):
    """runtime: '' (a TPU v5e-8, as below) or 'gpu8' (one node of 8 x 80 GB GPUs, one process; jaxpref/layouts.py)."""
    c = config_lib.sd15_base_config("mapo")
    # Sized for a TPU v5e-8 as configs/dposd15.py (fsdp over every chip, remat, 2 pairs per chip per micro-batch);
    # without the reference the step holds one UNet's params where DPO's holds two.
    c.batch_size = 128
    c.grad_accum = 8
    c.total_steps = 2000
    c.prompt_dropout = 0.0
    c.optimizer.update(name="adamw", lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, warmup_steps=0,
                       schedule="constant", grad_clip=1.0, decay_steps=2000)
    c.mapo.update(beta=0.1, snr_value=0.5)
    c.checkpoint.update(every=500, keep=3)
    c.eval.update(every=500)
    return layouts.for_runtime(c, runtime)
