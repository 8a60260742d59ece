"""What a run builds from its config before the loop: models, method, optimizer, and the sharded state
and compiled train step.

One abstract state for every entry point (maxdiffusion's ``get_abstract_state``): ``abstract_state``
gives the state's shapes and shardings from ``jax.eval_shape`` (no weights touched), ``init_state``
creates it directly sharded, and ``compile_train_step`` compiles the step ahead of time with explicit
in/out shardings and a donated state. The train loop, the benchmarks and the tests all call these.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import config_lib, diffusion, hub, lora, optim, sharding, step as step_lib
from jaxpref.data.tokenizer import tokenize
from jaxpref.methods import Method, get_method
from jaxpref.models import attention, conditioning, pipeline as pipeline_lib
from jaxpref.models.unet import load_unet


@dataclasses.dataclass
class Run:
    """The built pieces of one run."""
    config: Any
    pipeline: pipeline_lib.SDPipeline
    schedule: diffusion.NoiseSchedule
    method: Method
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
        """(L, D) of the caption embeddings; for SDXL a dict of the conditioning's row shapes."""
        return conditioning.cond_shapes(self.pipeline.text_encoder, self.null_ids.shape[0],
                                        self.pipeline.unet.cross_attention_dim)


def build_run(config, pipeline: pipeline_lib.SDPipeline | None = None) -> Run:
    """Loads the models (unless given; a hub id is fetched first, see ``hub.resolve_run_paths``) and binds the
    method, schedule and optimizer."""
    if pipeline is None:
        vae_path = config.vae_path and hub.resolve(config.vae_path, key="config.vae_path", components=("vae",))
        pipeline = pipeline_lib.load_pipeline(
            hub.resolve(config.model_path, key="config.model_path"), config_lib.DTYPES[config.dtype],
            vae_path=vae_path, vae_dtype=config_lib.DTYPES.get(config.vae_dtype))
    unet = pipeline.unet.clone(remat=config.remat, remat_policy=config.remat_policy, attention_impl=config.attention)
    schedule = diffusion.NoiseSchedule.from_config(pipeline.scheduler_config)
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"{pipeline.folder}/scheduler: prediction_type={schedule.prediction_type!r}; the DPO/DRO/SmPO "
                         "losses here are written for epsilon-prediction models (SD1.5)")
    null_ids = tokenize(pipeline.tokenizer, [""])[0]
    method = get_method(config.objective)(config, unet, pipeline.text_encoder, schedule, null_ids=null_ids,
                                          scaling_factor=pipeline.vae.scaling_factor)
    return Run(config=config, pipeline=pipeline, schedule=schedule, method=method,
               optimizer=optim.make_optimizer(config.optimizer),
               learning_rate=optim.learning_rate_schedule(config.optimizer), null_ids=null_ids,
               reference_params=_load_reference(config, pipeline) if method.uses_reference else None)


def _load_reference(config, pipeline):
    """The frozen reference UNet of ``config.reference_path`` (a pipeline or UNet folder), shape-checked."""
    if not config.reference_path:
        return None
    folder = hub.resolve(config.reference_path, key="config.reference_path", components=("unet",))
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
    text encoder. The reference defaults to the policy's starting weights; with LoRA it is also the base
    the adapters apply to (one copy). A method that reads no reference (``uses_reference`` False) gets none
    unless LoRA needs the base: no second UNet in memory."""
    text = run.pipeline.text_encoder_params
    if not run.method.uses_reference and not run.config.lora.enabled:
        return {"text": text}
    ref = run.pipeline.unet_params if run.reference_params is None else run.reference_params
    ref_dtype = config_lib.DTYPES[run.config.reference_dtype]
    return {"ref": jax.tree_util.tree_map(lambda p: jnp.asarray(p, ref_dtype), ref), "text": text}


def start_params(run: Run):
    """What the trained params start from: the UNet (full fine-tune) or, with ``config.lora``, the adapters
    (fresh, or a diffusers LoRA file's)."""
    if not run.config.lora.enabled:
        return run.pipeline.unet_params
    return lora.initial_adapters(run.config.lora, run.pipeline.unet_params, run.config.seed)


def _start_shapes(run: Run):
    if not run.config.lora.enabled:
        return run.pipeline.unet_params
    return jax.eval_shape(lambda p: lora.init_adapters(jax.random.PRNGKey(0), p, run.config.lora),
                          run.pipeline.unet_params)


def _init_fn(run: Run):
    return lambda params: step_lib.init_train_state(params, run.optimizer, run.config, run.method,
                                                    text_shape=run.text_shape, latent_shape=run.latent_shape)


def state_shardings(mesh, state_shapes, config, method: Method):
    """The config's sharding rules over the state; the method's own rules first for its state."""
    method_rules = tuple((f"method_state/{p}", r) for p, r in method.state_sharding_rules)
    return sharding.tree_sharding(mesh, state_shapes, method_rules + tuple(config.sharding_rules))


def frozen_shardings(run: Run, mesh, frozen):
    return sharding.tree_sharding(mesh, frozen, tuple(run.config.sharding_rules))


def abstract_state(run: Run, mesh):
    """(state shapes, state shardings) from ``jax.eval_shape``: no weights are read or allocated."""
    shapes = jax.eval_shape(_init_fn(run), _start_shapes(run))
    return shapes, state_shardings(mesh, shapes, run.config, run.method)


def init_state(run: Run, mesh):
    """The initial TrainState, born sharded (jit with the abstract state's out-shardings). Returns
    (state, shapes, shardings)."""
    shapes, shardings = abstract_state(run, mesh)
    state = jax.jit(_init_fn(run), out_shardings=shardings)(start_params(run))
    return state, shapes, shardings


def jit_train_step(run: Run, mesh, state_sharding, frozen_sharding, batch_shapes):
    """``train_step(state, batch, rng, frozen)`` jitted with explicit shardings and a donated state.

    Traced under ``attention.use_mesh(mesh)``: the attention backend is the mesh's platform's (a TPU
    topology's step compiled on a CPU host runs Pallas attention), sharded over its batch axes."""
    step = step_lib.make_train_step(run.config, run.method, run.optimizer, run.learning_rate)

    def train_step(*args):
        with attention.use_mesh(mesh):
            return step(*args)

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.rows_sharding(mesh, batch_shapes), sharding.replicated(mesh),
                      frozen_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def lower_train_step(run: Run, mesh, state, batch, frozen, rng=None):
    """The train step lowered for these arguments (arrays or ShapeDtypeStructs), not yet compiled."""
    state_shapes = jax.eval_shape(lambda s: s, state)
    step = jit_train_step(run, mesh, state_shardings(mesh, state_shapes, run.config, run.method), frozen_shardings(run, mesh, frozen),
                          jax.eval_shape(lambda b: b, batch))
    rng = jax.random.PRNGKey(0) if rng is None else rng
    with _gc_paused():
        return step.lower(state, batch, rng, frozen)


@contextlib.contextmanager
def _gc_paused():
    """Python's cycle collector off while a step is traced: tracing makes short-lived objects by the
    million, and the collections they set off rescan every live object each time (measured on the tiny DRO
    step: lowering 5.9 -> 4.7 s). Back on right after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# This process's last compiled train step, by program: a second ``train()`` of the same program (the next seed of
# a sweep, a notebook cell run again, a resume in the same process) reuses the executable instead of loading it
# from the persistent cache, which takes seconds on CPU. One only: a loaded executable keeps its code in device
# memory (0.3-1.1 GiB per chip for an SD1.5 step on TPU), which older programs would hold for nothing.
_COMPILED: collections.OrderedDict[str, Any] = collections.OrderedDict()
_COMPILED_KEEP = 1


def compile_train_step(run: Run, mesh, state, batch, frozen, rng=None):
    """The train step compiled ahead of time for these arguments (arrays or ShapeDtypeStructs):
    ``compiled(state, batch, rng, frozen) -> (state, metrics)``. The program (its StableHLO, shardings and
    donation included) and the mesh's devices are the key of this process's cache."""
    lowered = lower_train_step(run, mesh, state, batch, frozen, rng)
    devices = [(d.platform, d.id) for d in mesh.devices.flat]
    # Op names count where the persistent cache counts them (a profiled run: ``train._profiled_names``).
    names = bool(getattr(jax.config, "jax_compilation_cache_include_metadata_in_key", False))
    key = hashlib.sha256(f"{devices}\n{lowered.as_text(debug_info=names)}".encode()).hexdigest()
    if key not in _COMPILED:
        _COMPILED[key] = lowered.compile()
        while len(_COMPILED) > _COMPILED_KEEP:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
