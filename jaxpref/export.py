"""Export a trained policy as a diffusers StableDiffusionPipeline folder (trained UNet + the base's parts).

    python -m jaxpref.export --checkpoint=WORKDIR_OR_FOLDER --out=/models/dro-sd15 --base=/models/sd15

``--base`` (and ``--checkpoint``) may also be a Hugging Face hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``,
fetched into the Hugging Face cache: ``jaxpref.hub``) or ``embedded:tiny``, the shipped tiny model.

The exported folder loads with ``diffusers.StableDiffusionPipeline.from_pretrained(out)`` in PyTorch,
so results leave this repo in the format everyone else evaluates. ``--checkpoint`` is any of:

- a diffusers pipeline folder (model_index.json; e.g. an earlier export): its unet/ is the policy,
  and it is its own base unless --base is given;
- a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors); needs --base;
- a training workdir (has checkpoints/): the policy params come from
  ``jaxpref.checkpoint.load_policy_params(workdir, unet_shapes, use_ema=True)`` (EMA weights by default,
  as DRO's checkpoints hold); needs --base (the model the run started from).

- a LoRA run's workdir (config.json has lora.enabled): its checkpoint holds adapters only; the export writes
  ``OUT/pytorch_lora_weights.safetensors`` (PEFT key names, r and α in the header's metadata) that
  ``diffusers.StableDiffusionPipeline.load_lora_weights(OUT)`` loads onto the base; ``--merge`` writes a full
  pipeline folder with W + (α/r)·B A in the kernels instead;
- a diffusers/PEFT LoRA (``pytorch_lora_weights.safetensors`` or its folder): with ``--merge``, the merged pipeline.

    python -m jaxpref.export --checkpoint=LORA_WORKDIR --base=/models/sd15 --out=/models/dpo-sd15-lora
    python -m jaxpref.export --checkpoint=LORA_WORKDIR --base=/models/sd15 --out=/models/dpo-sd15-merged --merge

A fine-tune never changes the UNet's shapes, so a policy whose params do not match the base UNet's
(another architecture, e.g. an SDXL UNet against an SD1.5 base) fails before anything is written.
"""
from __future__ import annotations

if __name__ == "__main__":
    from jaxpref import console as _console
    _console.quiet_native_logs()   # before jax loads: XLA's C++ log reads its level once

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from absl import flags

from jaxpref import checkpoint as checkpoint_lib, hub, lora, run_config
from jaxpref.models import pipeline as pipeline_lib, unet as unet_lib, weights

KINDS = ("pipeline", "unet", "workdir", "lora")


def checkpoint_kind(path: str) -> str:
    """'pipeline' | 'unet' | 'workdir' | 'lora' for a --checkpoint path; ValueError naming what was expected."""
    if os.path.isfile(path) and path.endswith(".safetensors") or os.path.isfile(os.path.join(path, lora.WEIGHT_NAME)):
        return "lora"
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint folder; expected a diffusers pipeline folder (model_index.json), "
                         "a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) or a training "
                         "workdir (checkpoints/)")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "pipeline"
    if os.path.isdir(os.path.join(path, "checkpoints")):  # before config.json: a workdir has its run's config.json
        return "workdir"
    if os.path.isfile(os.path.join(path, "config.json")):
        config = weights.read_config(path)
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ValueError(f"{path}/config.json: _class_name={config.get('_class_name')!r}; expected a diffusers "
                             "UNet2DConditionModel folder")
        return "unet"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    raise ValueError(f"{path}: not a checkpoint; expected model_index.json (diffusers pipeline), config.json + "
                     f"diffusion_pytorch_model.safetensors (diffusers UNet) or checkpoints/ (training workdir); "
                     f"found {sorted(os.listdir(path))}")


def _shape_table(tree) -> dict[str, tuple]:
    return {"/".join(getattr(k, "key", str(k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_same_architecture(params, expected_shapes, source: str, base: str) -> None:
    """Raises ValueError (naming both paths and the first differences) unless the trees match in shape."""
    got, want = _shape_table(params), _shape_table(expected_shapes)
    diffs = [f"{k}: checkpoint {got.get(k)}, base {want.get(k)}" for k in sorted(set(got) | set(want))
             if got.get(k) != want.get(k)]
    if diffs:
        raise ValueError(f"{source}: UNet params do not fit the base model's UNet ({base}/unet): another architecture? "
                         f"{len(diffs)} differences, e.g.\n  " + "\n  ".join(diffs[:10]))


def _policy_from_workdir(workdir: str, unet_shapes: Any, use_ema: bool):
    load = getattr(checkpoint_lib, "load_policy_params", None)
    if load is None:
        raise ValueError(f"{workdir}: a training workdir needs jaxpref.checkpoint.load_policy_params(workdir, "
                         "unet_shapes, use_ema) to read its policy params, and this checkout has none; export the UNet "
                         "from the run (config.checkpoint.export_unet) and pass that folder instead")
    return load(workdir, unet_shapes, use_ema=use_ema)


def lora_run_config(workdir: str) -> dict | None:
    """A training workdir's ``lora`` config (from its config.json) when the run trained LoRA adapters, else None."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f).get("lora") or {}
    return cfg if cfg.get("enabled") else None


def load_adapters(checkpoint: str, kind: str, unet_shapes: Any, use_ema: bool = True):
    """(adapters, rank, alpha) of a LoRA checkpoint (a LoRA run's workdir or a diffusers LoRA file), or None."""
    if kind == "lora":
        return lora.load_diffusers_lora(checkpoint, unet_shapes)
    cfg = lora_run_config(checkpoint) if kind == "workdir" else None
    if cfg is None:
        return None
    adapters = _policy_from_workdir(checkpoint, None, use_ema)
    shape_keys = {f.name for f in dataclasses.fields(_Lora)}   # the settings that make the adapters' shapes
    settings = _Lora(**{k: v for k, v in cfg.items() if k in shape_keys})
    want = jax.eval_shape(lambda p: lora.init_adapters(jax.random.PRNGKey(0), p, settings), unet_shapes)
    check_same_architecture(adapters, want, checkpoint, "its config.json's lora settings on the base")
    return adapters, int(cfg["rank"]), float(cfg["alpha"])


@dataclasses.dataclass
class _Lora:
    """The lora section of a run's config.json, attribute-style (as ``lora.init_adapters`` reads it)."""
    enabled: bool = True
    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple = lora.DEFAULT_TARGETS
    dropout: float = 0.0
    init_from: str = ""


def local_model_args(checkpoint: Optional[str], base: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """--checkpoint and --base as local paths: 'embedded:tiny' and hub ids (org/name[@rev][/subfolder], fetched
    into the Hugging Face cache) become folders; a local path, or a missing one, stays as given (a missing
    checkpoint is then named by ``checkpoint_kind``)."""
    if base:
        base = hub.resolve(base, key="--base")
    if checkpoint and (checkpoint == hub.EMBEDDED_TINY or hub.is_hub_id(checkpoint)):
        checkpoint = hub.resolve(checkpoint, key="--checkpoint")
    return checkpoint, base


def load_trained(checkpoint: Optional[str], base: Optional[str], *, dtype=jnp.float32,
                 use_ema: bool = True) -> tuple[pipeline_lib.SDPipeline, Any]:
    """(pipeline with the policy's UNet module, policy UNet params) for a --checkpoint (module docstring).

    ``checkpoint`` None evaluates/exports the base itself. ``dtype`` is the compute dtype; params fp32.
    """
    checkpoint, base = local_model_args(checkpoint, base)
    kind = checkpoint_kind(checkpoint) if checkpoint else None
    base = base or (checkpoint if kind == "pipeline" else None)
    if base is None:
        raise ValueError(f"{checkpoint}: a {kind} checkpoint holds only the UNet; pass the base model folder (--base / "
                         "--model_path) for the VAE, text encoder, tokenizer and scheduler")
    pipe = pipeline_lib.load_pipeline(base, dtype)
    if kind is None:
        return pipe, pipe.unet_params
    if kind in ("workdir", "lora"):
        found = load_adapters(checkpoint, kind, pipe.unet_params, use_ema)
        if found is not None:
            adapters, rank, alpha = found
            return pipe, jax.device_get(lora.merge(pipe.unet_params, adapters, alpha / rank))
    if kind == "workdir":
        params = _policy_from_workdir(checkpoint, unet_lib.unet_param_shapes(pipe.unet), use_ema)
        check_same_architecture(params, pipe.unet_params, checkpoint, base)
        return pipe, params
    unet_dir = os.path.join(checkpoint, "unet") if kind == "pipeline" else checkpoint
    if os.path.abspath(unet_dir) == os.path.abspath(os.path.join(base, "unet")):
        return pipe, pipe.unet_params
    module, params = unet_lib.load_unet(unet_dir, dtype)
    check_same_architecture(params, pipe.unet_params, unet_dir, base)
    return dataclasses.replace(pipe, unet=module), params


def run_base(checkpoint: Optional[str]) -> Optional[str]:
    """The model a training workdir trained from (its config.json's model_path), else None."""
    settings = run_config.stored(checkpoint) if checkpoint else None
    return settings.get("model_path") if settings else None


def export(checkpoint: Optional[str], out: str, base: Optional[str] = None, *, use_ema: bool = True,
           overwrite: bool = False, merge: bool = False) -> str:
    """Writes the diffusers pipeline folder ``out`` (fp32 safetensors) and returns it; for a LoRA run without
    ``merge``, ``out/pytorch_lora_weights.safetensors`` (the adapters) instead."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out} is a file; pass a folder to write the model into")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; choose a new --out or pass --overwrite")
    checkpoint, base = local_model_args(checkpoint, base or run_base(checkpoint))
    kind = checkpoint_kind(checkpoint) if checkpoint else None
    if kind == "lora" and not merge:
        raise ValueError(f"{checkpoint}: already a diffusers LoRA; pass --merge to write the merged pipeline")
    if kind == "workdir" and not merge and lora_run_config(checkpoint) is not None:
        if base is None:
            raise ValueError(f"{checkpoint}: a LoRA run's adapters need the base model folder (--base) they apply to")
        shapes = unet_lib.unet_param_shapes(weights.read_config(os.path.join(base, "unet")))
        adapters, rank, alpha = load_adapters(checkpoint, kind, shapes, use_ema)
        return lora.save_diffusers_lora(out, adapters, rank, alpha)
    pipe, params = load_trained(checkpoint, base, use_ema=use_ema)
    pipeline_lib.save_pipeline(out, pipe, unet_params=params)
    return out


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    path = export(f.checkpoint, f.out, f.base, use_ema=f.use_ema, overwrite=f.overwrite, merge=f.merge)
    if path.endswith(".safetensors"):
        what = "diffusers LoRA: pipe.load_lora_weights"
    else:
        with open(os.path.join(path, "model_index.json")) as index:
            what = "diffusers " + json.load(index)["_class_name"]
    print(f"exported {f.checkpoint} -> {path} ({what})", flush=True)


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "pipeline folder, UNet folder, training workdir (full or LoRA) or a "
                                            "diffusers LoRA file; or a hub id of a pipeline, UNet or LoRA",
                        required=True)
    flags.DEFINE_string("out", None, "output folder (a diffusers pipeline, or a LoRA run's adapters file)",
                        required=True)
    flags.DEFINE_string("base", None, "base diffusers SD folder (VAE, text encoder, tokenizer, scheduler), a "
                                      "Hugging Face hub id org/name[@revision] or embedded:tiny (default for a "
                                      "training workdir: the model it trained from, its config.json's model_path)")
    flags.DEFINE_bool("use_ema", True, "training workdirs: export the EMA params (False: the raw params)")
    flags.DEFINE_bool("overwrite", False, "write into a non-empty --out")
    flags.DEFINE_bool("merge", False, "LoRA checkpoints: write the merged pipeline (W + α/r·BA) instead of the "
                                      "adapters file")


if __name__ == "__main__":
    _define_flags()
    _console.run(main, "jaxpref.export")
