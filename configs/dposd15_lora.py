"""Diffusion-DPO on Stable Diffusion 1.5 with LoRA adapters: one small accelerator (a 16 GiB TPU v5e chip).

What it trains: rank-8 LoRA adapters (α = 8, PEFT's init: A kaiming-uniform, B = 0) on the attention
projections to_q/to_k/to_v/to_out.0 of every SD1.5 transformer block (1.59 M params) with the Diffusion-DPO
loss (β = 5000) on Pick-a-Pic v2 pairs; the frozen base UNet is stored once in bf16 and is also the
reference. The settings follow the diffusers Diffusion-DPO LoRA example: AdamW lr 1e-5 constant, no warmup,
32 pairs per update (2 per micro-batch x 16 micro-batches), 10,000 updates, remat, 512 px.
Memory (docs/performance.md): the state is 2.08 GiB (adapters + AdamW 0.018 GiB, bf16 base/reference
1.60 GiB, text encoder 0.46 GiB) against 11.67 GiB for the full fine-tune. Compiled by the TPU compiler
for one v5e chip the step needs 6.0 GiB at 4 pairs per micro-batch; XLA:CPU's memory analysis gives 18.6 GiB
with 4 and 15.4 GiB with 2 pairs, the 2 this file keeps (safe on either count).
Cost: 10,000 x 32 pairs, one policy forward/backward and one reference forward per pair. Expected result:
unmeasured; the LoRA run of the diffusers example is reported as experimental (low-data regime).

The other objectives take the same overrides on their configs:

  --config.lora.enabled=True --config.lora.rank=8 --config.lora.alpha=8 --config.optimizer.lr=1e-5 --config.remat=True
  (configs/drosd15.py, configs/smposd15.py; drosd15's EMA then averages the adapters, DRO's sampling copy is a copy
  of the adapters on the shared base, SmPO inverts with base + adapters)

Export: ``python -m jaxpref.export --checkpoint=/runs/dpo_lora --base=stable-diffusion-v1-5/stable-diffusion-v1-5
--out=/models/dpo_lora`` writes pytorch_lora_weights.safetensors (``pipe.load_lora_weights``); ``--merge``
writes a merged diffusers pipeline folder. Resume from a diffusers LoRA: ``--config.lora.init_from=FILE``.

  python -m jaxpref.train --config=configs/dposd15_lora.py --workdir=/runs/dpo_lora \
      --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=/data/tfds
"""
from jaxpref import config_lib


def get_config():
    c = config_lib.base_config()
    c.objective = "dpo"
    c.model_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # a hub id, or a local diffusers folder
    c.dtype = c.reference_dtype = "bfloat16"   # the frozen base/reference stored in bf16
    c.remat = True
    c.lora.update(enabled=True, rank=8, alpha=8.0)
    c.batch_size, c.grad_accum = 32, 16       # 2 pairs per micro-batch: 15.4 GiB on XLA:CPU
    c.total_steps = 10000
    c.optimizer.update(name="adamw", lr=1e-5, weight_decay=1e-2, warmup_steps=0, schedule="constant",
                       grad_clip=1.0, decay_steps=10000)
    c.dpo.beta = 5000.0
    c.data.update(name="pickapic_v2", resolution=512)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(every=2000, num_prompts=64, sampler="ddim", num_steps=50, guidance_scale=7.5)
    return c
