"""The embedded default: Diffusion-DRO on the shapes world with the shipped tiny model, on a laptop CPU.

Purpose: the quickstart; trains the tiny SD-shaped UNet (jaxpref/assets/tiny_sd, made by
``python -m jaxpref.world.train_base``) with DRO against its own generations (``dro.negative_target="sample"``,
the ablation's best DRO form: docs/results.md).
Data: the shapes world's top-500 renders (by its exact reward) as experts; held-out captions for evaluation.
Cost: 50 updates of 16 pairs, one evaluation after 25, base and trained at the end (32 prompts x 4 images,
DDIM 25, CFG 3); about 2 minutes on 2 CPU cores with empty caches, most of it the first compile.
Expected (seeds 0 / 1 / 2, benchmarks/results/demo_tiny.json): held-out mean reward 0.572 -> 0.628 (seed 0),
gain +0.056 / +0.029 / +0.036 (mean +0.040), per-prompt win rate 0.81 / 0.72 / 0.66.

The argument picks another objective on the same world: ``:dpo`` and ``:smpo`` train on the shapes
preference pairs (SmPO's reward is the world's exact reward), ``:kto`` (each pair's images as desirable /
undesirable) and ``:mapo`` (no reference) on the same pairs, ``:sft`` denoises the preferred render of each
pair (SmPO's first stage); these run 150 updates at constant 1e-4 (3e-4 and up made DPO and SmPO worse
than the base model), KTO and MaPO untuned on this world.

  python -m jaxpref.train --workdir=/tmp/tiny                     # this file, objective "dro"
  python -m jaxpref.train --config=configs/tiny.py:dpo --workdir=/tmp/tiny_dpo

  # SFT, then SmPO from the SFT run's export (seed 0; held-out mean reward 0.572 base, 0.568 after SFT,
  # 0.599 after SmPO from the SFT model)
  python -m jaxpref.train --config=configs/tiny.py:sft --workdir=runs/tiny_sft
  python -m jaxpref.train --config=configs/tiny.py:smpo --config.model_path=runs/tiny_sft/export \
      --workdir=runs/tiny_sft_smpo
"""
from jaxpref import config_lib
from jaxpref.models.pipeline import EMBEDDED_TINY


def get_config(objective: str = "dro"):
    c = config_lib.base_config()
    c.objective = objective
    c.model_path = EMBEDDED_TINY
    c.dtype = c.reference_dtype = "float32"   # CPU: bf16 is emulated and slower
    c.batch_size, c.grad_accum = 16, 1
    c.total_steps = 150
    c.prompt_dropout = 0.1
    c.optimizer.update(name="adamw", lr=1e-4, weight_decay=0.0, warmup_steps=10, schedule="constant",
                       grad_clip=1.0, decay_steps=150)
    c.checkpoint.update(every=50, keep=2)
    c.eval.update(every=50)
    if objective == "dro":
        # The quickstart: the held-out gain of 150 updates (cosine from 3e-4) is reached by update 50, so 50
        # updates at a constant 3e-4 (docs/results.md has both).
        c.total_steps = 50
        c.optimizer.update(lr=3e-4)
        c.checkpoint.update(every=25)
        c.eval.update(every=25)
    c.ema.update(enabled=True)                # EMA as DRO's reference code keeps (min((1+s)/(10+s), 0.9999))
    c.dpo.beta = 500.0
    c.kto.beta = 250.0   # KTO's logit is β(g − z) per image, DPO's β/2 · (Δθ − Δref): DPO's 500 halved
    c.smpo.update(beta=500.0, gamma=10.0, reward_min=0.0, reward_max=1.0, inversion="none",
                  inversion_steps=5)
    c.dro.update(num_inference_steps=10, buffer_size=16, steps_per_trajectory=1, negative_target="sample")
    c.data.update(name="shapes", resolution=32, experts_k=500)
    c.log.update(every=10)
    c.eval.update(prompts="shapes", rewards="shapes", num_prompts=32, images_per_prompt=4,
                  sampler="ddim", num_steps=25, guidance_scale=3.0, batch_size=64)
    return c
