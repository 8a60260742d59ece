"""Diffusion-DPO on SDXL base 1.0 with LoRA adapters, the settings of diffusers' Diffusion-DPO SDXL LoRA example.

What it trains: rank-8 LoRA adapters (α = 8, PEFT's init: A kaiming-uniform, B = 0) on the attention
projections to_q/to_k/to_v/to_out.0 of every SDXL transformer block, with the Diffusion-DPO loss (β = 5000) on
Pick-a-Pic v2 pairs at 1024 px; the frozen base UNet is stored once in bf16 and is also the reference (the
example disables the adapters for the reference pass: the same model).
Sources, huggingface/diffusers ``examples/research_projects/diffusion_dpo``: its README's SDXL command gives
rank 8, lr 1e-5 constant with no warmup, 8 pairs per device x 2 accumulation = 16 pairs per update on one
GPU, 2000 updates, gradient checkpointing (remat), the fp16-fix VAE; ``train_diffusion_dpo_sdxl.py`` gives
β = 5000 (``--beta_dpo``), 1024 px, center crop (``--random_crop`` off), random horizontal flip (build the
latent cache with ``--flips`` for it), AdamW weight decay 1e-2 (the README's 8-bit Adam: ours keeps the
moments of the 11.6 M adapter params in fp32, 0.09 GiB), grad-norm clip 1.0, no prompt dropout, and time ids from each image's
original size and crop top-left (``data.time_ids="crop"``, the default).
Ours: 16 pairs per update on a 4-chip v5p-8 or v4-8, 1 pair per chip per micro-batch x 4 micro-batches. Memory:
the step's arguments are 2.08 GiB per chip (adapters and AdamW 0.11, bf16 base/reference 1.20, text encoders
0.76; ``jaxpref.aot``'s accounting) against 4.88 for the full fine-tune, whose compiled step needs 19.5 GiB per
chip on a v5p-8 and 20.7 on a v4-8 at the same micro-batch (docs/performance.md); the LoRA step itself is
uncompiled for TPU (its activations are the full fine-tune's: the backward still runs through the UNet).
Cost: 2000 x 16 pairs, one policy forward/backward and one reference forward per pair. Expected result:
unmeasured; the example's scripts are described by their authors as experimental (low-data regime).

The other SDXL objectives take the same overrides on their configs:

  --config.lora.enabled=True --config.lora.rank=8 --config.lora.alpha=8 --config.optimizer.name=adamw \
  --config.optimizer.lr=1e-5 --config.optimizer.warmup_steps=0 --config.reference_dtype=bfloat16
  (configs/drosdxl.py, configs/smposdxl.py)

Export: ``python -m jaxpref.export --checkpoint=/runs/dposdxl_lora --base=stabilityai/stable-diffusion-xl-base-1.0
--out=/models/dposdxl_lora`` writes pytorch_lora_weights.safetensors
(``StableDiffusionXLPipeline.load_lora_weights``); ``--merge`` writes a merged diffusers SDXL folder.

  python -m jaxpref.train --config=configs/dposdxl_lora.py --workdir=/runs/dposdxl_lora \
      --config.model_path=stabilityai/stable-diffusion-xl-base-1.0 --config.vae_path=madebyollin/sdxl-vae-fp16-fix \
      --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.sdxl_base_config("dpo")
    c.reference_dtype = "bfloat16"            # the frozen base/reference stored once, in bf16
    c.lora.update(enabled=True, rank=8, alpha=8.0)
    c.prompt_dropout = 0.0
    c.data.time_ids = "crop"
    c.batch_size, c.grad_accum = 16, 4        # 1 pair per chip per micro-batch on 4 chips
    c.total_steps = 2000
    c.optimizer.update(name="adamw", lr=1e-5, weight_decay=1e-2, warmup_steps=0, schedule="constant",
                       grad_clip=1.0, decay_steps=2000)
    c.dpo.beta = 5000.0
    c.checkpoint.update(every=500, keep=3)
    c.eval.update(every=500, sampler="ddim", guidance_scale=5.0)
    return c
