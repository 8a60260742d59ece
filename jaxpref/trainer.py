"""Everything a run builds from its config before the loop: models, objective, optimizer, state.

``train.py`` is the loop; this module is the wiring, so tests and benchmarks build exactly what a run
builds.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import diffusion, optim, step as step_lib
from jaxpref.models import pipeline as pipeline_lib

EMBEDDED_TINY = "embedded:tiny"
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_model_path(path: str) -> str:
    """"embedded:tiny" -> the tiny SD folder shipped in the package; anything else unchanged."""
    if path == EMBEDDED_TINY:
        folder = os.path.join(_ASSETS, "tiny_sd")
        if not os.path.isdir(folder):
            raise ValueError(f"config.model_path='{EMBEDDED_TINY}': the shipped tiny model is missing at {folder}; "
                             "regenerate it with `python -m jaxpref.tiny.train_base`")
        return folder
    return path


@dataclasses.dataclass
class Run:
    """The built pieces of one run."""
    config: Any
    pipeline: pipeline_lib.SDPipeline
    schedule: diffusion.NoiseSchedule
    objective: step_lib.Objective
    optimizer: Any
    learning_rate: Any
    null_ids: np.ndarray
    reference_params: Any = None  # config.reference_path's UNet; None: the policy's starting weights

    @property
    def latent_shape(self):
        """(h, w, c) of the latents the UNet trains on, from the config's image resolution."""
        factor = 2 ** (len(self.pipeline.vae.block_out_channels) - 1)
        res = self.config.data.resolution
        return (res // factor, res // factor, self.pipeline.unet.in_channels)

    @property
    def text_shape(self):
        """(L, D) of the caption embeddings."""
        return (self.null_ids.shape[0], self.pipeline.unet.cross_attention_dim)


def tokenize(tokenizer, captions) -> np.ndarray:
    """Captions -> [B, L] int32, padded/truncated to the tokenizer's model_max_length (as SD does)."""
    out = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)


def build_run(config, pipeline: pipeline_lib.SDPipeline | None = None) -> Run:
    """Loads the models (unless given) and binds the objective, schedule and optimizer."""
    if pipeline is None:
        pipeline = pipeline_lib.load_pipeline(resolve_model_path(config.model_path), DTYPES[config.dtype])
    unet = pipeline.unet.clone(remat=config.remat) if config.remat else pipeline.unet
    schedule = diffusion.NoiseSchedule.from_config(pipeline.scheduler_config)
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"{pipeline.folder}/scheduler: prediction_type={schedule.prediction_type!r}; the DPO/DRO/SmPO "
                         "losses here are written for epsilon-prediction models (SD1.5)")
    null_ids = tokenize(pipeline.tokenizer, [""])[0]
    objective = step_lib.Objective(config, unet, pipeline.text_encoder, schedule, null_ids=null_ids,
                                   scaling_factor=pipeline.vae.scaling_factor)
    return Run(config=config, pipeline=pipeline, schedule=schedule, objective=objective,
               optimizer=optim.make_optimizer(config.optimizer),
               learning_rate=optim.learning_rate_schedule(config.optimizer), null_ids=null_ids,
               reference_params=_load_reference(config, pipeline))


def _load_reference(config, pipeline):
    """The frozen reference UNet of ``config.reference_path`` (a pipeline or UNet folder), shape-checked."""
    if not config.reference_path:
        return None
    from jaxpref.models import load_unet

    folder = config.reference_path
    if os.path.isdir(os.path.join(folder, "unet")):
        folder = os.path.join(folder, "unet")
    _, params = load_unet(folder)
    mismatch = [a.shape for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(pipeline.unet_params))
                if a.shape != b.shape]
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(pipeline.unet_params) or mismatch:
        raise ValueError(f"config.reference_path={config.reference_path!r}: its UNet does not match model_path's "
                         "architecture; the reference must be the same model as the policy")
    return params


def frozen_params(run: Run) -> dict:
    """What the step reads but never trains: the reference UNet (in config.reference_dtype) and the
    text encoder. The reference defaults to the policy's starting weights."""
    ref = run.pipeline.unet_params if run.reference_params is None else run.reference_params
    ref_dtype = DTYPES[run.config.reference_dtype]
    return {"ref": jax.tree_util.tree_map(lambda p: jnp.asarray(p, ref_dtype), ref),
            "text": run.pipeline.text_encoder_params}


def initial_state(run: Run) -> step_lib.TrainState:
    return step_lib.init_train_state(run.pipeline.unet_params, run.optimizer, run.config,
                                     text_shape=run.text_shape, latent_shape=run.latent_shape)
