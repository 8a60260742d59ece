"""What the train loop eats: global batches in the step's layout (``jaxpref.step`` docstring).

Picks the source the method asks for (preference pairs, or the expert set for methods whose
``data == "experts"``, or a latent cache of either), runs the grain loader on this host's shard, and
turns images into VAE posterior (mean, std) with one jitted encoder call when the source holds pixels
rather than cached latents.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from jaxpref import paths, sharding
from jaxpref.data import experts, loader, scores, sources
from jaxpref.models import vae as vae_lib


def open_train_source(config, method):
    """The data source of a run (ValueError naming what is missing and the command that builds it)."""
    d = config.data
    data_dir = d.data_dir or None
    if d.cache_dir:
        return sources.open_source(d.cache_dir)
    if method.data == "experts":
        if d.experts_dir:
            return sources.open_source(d.experts_dir)
        if d.name != "shapes":
            raise ValueError(f"config.data.experts_dir: objective {config.objective!r} trains on an expert set; build it with "
                             "`python -m jaxpref.data.experts --dataset pickapic_v2 --k 500 ...` and point this key at it")
        return sources.open_source(_shapes_experts(d, data_dir))
    scores_dir = d.scores_dir or None
    if method.needs_rewards and d.name != "shapes" and scores_dir is None:
        raise ValueError(f"config.data.scores_dir: {config.objective} needs reward scores for both images of each "
                         "pair; build them with `python -m jaxpref.data.scores ...` (PickScore) and point this key at "
                         "the folder")
    return sources.open_source(d.name, d.split, data_dir, scores=scores_dir)


def _shapes_experts(d, data_dir) -> str:
    """The shapes world's top-K expert set by its analytic reward, built once into the data dir."""
    root = os.path.expanduser(data_dir or paths.default_data_dir())
    out = os.path.join(root, f"shapes_experts_k{d.experts_k}")
    experts.build_experts("shapes", out, scores.get_scorer("shapes"), k=d.experts_k, split=d.split,
                          data_dir=data_dir, scorer_name="shapes")
    return out


class TrainFeed:
    """next() -> global batch dict; get_state()/set_state() for checkpoints."""

    def __init__(self, config, run, mesh):
        self.config, self.run, self.mesh = config, run, mesh
        method = run.method
        source = open_train_source(config, method)
        method.check_data(config, source)
        tokenizer_dir = os.path.join(run.pipeline.folder, "tokenizer")
        self.needs_rewards = method.needs_rewards
        self.loader = loader.make_loader(
            source, config.batch_size, seed=config.seed, resolution=config.data.resolution, crop=config.data.crop,
            random_flip=True, order=method.pair_order, require_rewards=method.needs_rewards,
            tokenizer=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
            max_length=run.null_ids.shape[0], worker_count=config.data.worker_count,
            time_ids=run.pipeline.is_sdxl and config.data.time_ids == "crop")
        vae = run.pipeline.vae
        self._encode = jax.jit(lambda params, images: vae_lib.posterior(vae, params, images))
        self._vae_params = jax.device_put(run.pipeline.vae_params, sharding.replicated(mesh))

    def _latents(self, images):
        lead = images.shape[:-3]
        mean, std = self._encode(self._vae_params, images.reshape(-1, *images.shape[-3:]))
        return mean.reshape(*lead, *mean.shape[1:]), std.reshape(*lead, *std.shape[1:])

    def next(self) -> dict:
        local = next(self.loader)
        batch = {"input_ids": np.asarray(local["input_ids"], np.int32)}
        if "latent_mean" in local:
            batch["latent_mean"] = np.asarray(local["latent_mean"], np.float32)
            batch["latent_std"] = np.asarray(local["latent_std"], np.float32)
        else:
            batch["images"] = np.asarray(local["images"], np.uint8)
        if self.needs_rewards:
            batch["rewards"] = np.asarray(local["rewards"], np.float32)
        if "time_ids" in local:  # SDXL: each image's size and crop
            batch["time_ids"] = np.asarray(local["time_ids"], np.float32)
        batch = sharding.put_global_batch(self.mesh, batch)
        if "images" in batch:
            batch["latent_mean"], batch["latent_std"] = self._latents(batch.pop("images"))
        return batch

    def get_state(self) -> bytes:
        return self.loader.get_state()

    def set_state(self, state: bytes):
        self.loader.set_state(state)
