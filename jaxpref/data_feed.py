"""What the train loop eats: global batches in the step's layout (``jaxpref.step`` docstring).

Picks the source for the objective (preference pairs for DPO/SmPO, the expert set for DRO, or a latent
cache of either), runs the grain loader on this host's shard, and turns images into VAE posterior
(mean, std) with one jitted encoder call when the source holds pixels rather than cached latents.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import sharding

LOGVAR_CLIP = (-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


def open_train_source(config, model_folder: str):
    """The data source of a run (ValueError naming what is missing and the command that builds it)."""
    from jaxpref import data

    d = config.data
    data_dir = d.data_dir or None
    if d.cache_dir:
        return data.open_source(d.cache_dir)
    if config.objective == "dro":
        if d.experts_dir:
            return data.open_source(d.experts_dir)
        if d.name != "shapes":
            raise ValueError("config.data.experts_dir: DRO trains on an expert set; build it with "
                             "`python -m jaxpref.data.experts --dataset pickapic_v2 --k 500 ...` and point this key at it")
        return data.open_source(_shapes_experts(d, data_dir))
    scores = d.scores_dir or None
    if config.objective == "smpo" and d.name != "shapes" and scores is None:
        raise ValueError("config.data.scores_dir: SmPO needs reward scores for both images of each pair; build them "
                         "with `python -m jaxpref.data.scores ...` (PickScore) and point this key at the folder")
    return data.open_source(d.name, d.split, data_dir, scores=scores)


def _shapes_experts(d, data_dir) -> str:
    """The shapes world's top-K expert set by its analytic reward, built once into the data dir."""
    from jaxpref import data
    from jaxpref.data import sources

    root = os.path.expanduser(data_dir or os.fspath(sources.DEFAULT_DATA_DIR))
    out = os.path.join(root, f"shapes_experts_k{d.experts_k}")
    data.build_experts("shapes", out, data.get_scorer("shapes"), k=d.experts_k, split=d.split, data_dir=data_dir,
                       scorer_name="shapes")
    return out


class TrainFeed:
    """next() -> global batch dict; get_state()/set_state() for checkpoints."""

    def __init__(self, config, run, mesh):
        from jaxpref import data

        self.config, self.run, self.mesh = config, run, mesh
        source = open_train_source(config, run.pipeline.folder)
        tokenizer_dir = os.path.join(run.pipeline.folder, "tokenizer")
        self.loader = data.make_loader(
            source, config.batch_size, seed=config.seed, resolution=config.data.resolution,
            random_flip=True, order="reward" if config.objective == "smpo" else "label",
            require_rewards=config.objective == "smpo", tokenizer=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
            max_length=run.null_ids.shape[0], worker_count=config.data.worker_count)
        self.batch_sharding = sharding.batch_sharding(mesh)
        vae = run.pipeline.vae

        @jax.jit
        def encode(vae_params, images):
            """uint8 [N, H, W, 3] -> posterior (mean, std) [N, h, w, c] (unscaled)."""
            x = images.astype(jnp.float32) / 127.5 - 1.0
            mean, logvar = vae.apply({"params": vae_params}, x, method=vae.encode)
            return mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_CLIP))

        self._encode = encode
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
        if self.config.objective == "smpo":
            batch["rewards"] = np.asarray(local["rewards"], np.float32)
        batch = sharding.put_global_batch(self.mesh, batch)
        if "images" in batch:
            batch["latent_mean"], batch["latent_std"] = self._latents(batch.pop("images"))
        return batch

    def get_state(self) -> bytes:
        return self.loader.get_state()

    def set_state(self, state: bytes):
        self.loader.set_state(state)
