"""The embedded toy world: procedural *shapes* captions and images with an exact reward, and the tiny
SD-shaped base model trained on it. The models (``jaxpref.models``) never import it; the data layer opens
its datasets and the rewards score with its reward.

- ``shapes``: the caption grammar, renderer and exact reward (``reward_batch``), the held-out caption split;
- ``builder``: the TFDS builder of its datasets (preference pairs, base images), ``prepare_shapes``;
- ``train_base``: ``python -m jaxpref.world.train_base [--out DIR] [--steps-scale F] [--seed 0]`` trains the
  shipped tiny model (jaxpref/assets/tiny_sd; its configs are ``jaxpref.models.presets.TINY_SD_*``);
- its tokenizer (jaxpref/assets/shapes_tokenizer: every grammar word one token) is written by
  ``python -m jaxpref.data.tokenizer``.
"""
