"""The shipped tiny base model of the embedded default (jaxpref/assets/tiny_sd) and the script that trains it.

- its configs (VAE 32x32 -> 8x8x4, CLIP text encoder over the shapes tokenizer, UNet on 8x8 latents, SD1.5's
  scheduler) are ``jaxpref.models.presets.TINY_SD_*`` and ``SD15_SCHEDULER``;
- ``train_base``: ``python -m jaxpref.tiny.train_base [--out DIR] [--steps-scale F] [--seed 0]``.
"""
