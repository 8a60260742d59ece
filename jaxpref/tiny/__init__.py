"""The shipped tiny base model of the embedded default (jaxpref/assets/tiny_sd) and the script that trains it.

- ``configs``: the SD1.5-shaped configs (VAE 32x32 -> 8x8x4, CLIP text encoder over the shapes tokenizer,
  UNet on 8x8 latents, SD1.5's scheduler), as the dicts that land in each config.json;
- ``train_base``: ``python -m jaxpref.tiny.train_base [--out DIR] [--steps-scale F] [--seed 0]``.
"""
