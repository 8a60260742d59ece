"""LoRA adapters on the frozen UNet: a parameter transformation, the UNet module unchanged.

A target layer (a ``nn.Dense`` or ``nn.Conv`` whose diffusers name ends with one of
``config.lora.target_modules``) computes, as PEFT's ``lora.Linear`` / ``lora.Conv2d`` do,

  y = W x + b + (α / r) · B A dropout(x)        A: [in, r] (conv: [kh, kw, in, r], W's stride/padding), B: [r, out]

A is drawn like PEFT's default (kaiming-uniform with a = √5: U(±1/√fan_in)), B is zero, so at
initialisation the policy equals the base exactly. The adapters are a param tree shaped like the
UNet's modules: ``{'down_blocks_0': {... 'to_q': {'lora_A': [in, r], 'lora_B': [r, out]}}}``.

``LoraParams(base, adapters)`` stands for the policy wherever a UNet param tree is expected by
``apply``: the base stays the frozen reference (stored once, in ``config.reference_dtype``), the policy is
base + adapters, applied unmerged through a Flax method interceptor (no merged copy of the kernels).
``merge`` writes W + (α/r)·A B into the kernels (export, sampling, evaluation).
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import hub
from jaxpref.models import weights

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")           # every attention's projections
SUPPORTED_TARGETS = (*DEFAULT_TARGETS, "ff.net.0.proj", "ff.net.2",  # the transformer blocks' feed-forward
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj")  # the ResNet blocks


@flax.struct.dataclass
class LoraParams:
    """The policy: the frozen base UNet params plus adapters (``apply`` runs base + scale · B A)."""
    base: Any
    adapters: Any
    rng: Any = None                                                  # dropout key; None: no dropout
    scale: float = flax.struct.field(pytree_node=False, default=1.0)  # α / r
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)


def scale(lora_config) -> float:
    return float(lora_config.alpha) / float(lora_config.rank)


def policy(adapters, base, lora_config, rng=None) -> LoraParams:
    """The LoRA policy of a run's adapters; ``rng`` enables ``lora_config.dropout`` (training only)."""
    return LoraParams(base=base, adapters=adapters, rng=rng if lora_config.dropout > 0 else None,
                      scale=scale(lora_config), dropout=float(lora_config.dropout))


def without_dropout(params):
    """The same policy without dropout (sampling, inversion and diagnostics run the model deterministically)."""
    return params.replace(rng=None) if isinstance(params, LoraParams) else params


def trainable(params):
    """What a step trains of ``params``: the adapters of a LoRA policy, else the params themselves."""
    return params.adapters if isinstance(params, LoraParams) else params


def with_trainable(params, trainable_params):
    """``params`` with its trained part replaced (a stale sampling copy of the adapters, say)."""
    return params.replace(adapters=trainable_params) if isinstance(params, LoraParams) else trainable_params


def module_name(path: tuple[str, ...]) -> str:
    """A Flax module path as diffusers names the torch module: ('up_blocks_1', ..., 'to_out_0') ->
    'up_blocks.1....to_out.0'."""
    return weights.torch_key((*path, "kernel"))[:-len(".weight")]


def matches(name: str, targets) -> bool:
    """PEFT's target_modules rule: the module's full name is a target or ends with '.' + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def target_kernels(unet_params, targets) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{module path: kernel shape} of the layers the targets select (Dense [in, out], Conv [kh, kw, in, out])."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(unet_params)[0]:
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if names[-1] == "kernel" and len(leaf.shape) in (2, 4) and matches(module_name(names[:-1]), targets):
            out[names[:-1]] = tuple(leaf.shape)
    return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def flatten(adapters) -> dict[tuple[str, ...], dict]:
    """{module path: {'lora_A': A, 'lora_B': B}} of an adapter tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        names = tuple(getattr(k, "key", str(k)) for k in path)
        out.setdefault(names[:-1], {})[names[-1]] = leaf
    return out


def init_adapters(rng, unet_params, lora_config) -> dict:
    """Fresh fp32 adapters for ``unet_params`` (arrays or ShapeDtypeStructs): A ~ U(±1/√fan_in), B = 0.

    fan_in = in · kh · kw, PEFT's ``kaiming_uniform_(a=√5)`` bound √(6 / ((1 + a²) fan_in)).
    """
    kernels = target_kernels(unet_params, lora_config.target_modules)
    if not kernels:
        raise ValueError(f"config.lora.target_modules={tuple(lora_config.target_modules)!r}: no UNet layer matches; "
                         f"supported: {SUPPORTED_TARGETS}")
    r = int(lora_config.rank)
    flat = {}
    for i, (path, shape) in enumerate(sorted(kernels.items())):
        *window, fan_in_ch, out_ch = shape
        bound = 1.0 / math.sqrt(fan_in_ch * int(np.prod(window, dtype=np.int64)))
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*window, fan_in_ch, r), jnp.float32, -bound, bound)
        flat[path] = {"lora_A": a, "lora_B": jnp.zeros((r, out_ch), jnp.float32)}
    return _nest(flat)


def delta(a, b):
    """B A as a kernel: Dense [in, r] x [r, out] -> [in, out]; Conv [kh, kw, in, r] x [r, out] -> [kh, kw, in, out]."""
    return jnp.einsum("...ir,ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)


def merge(base, adapters, scale_: float):
    """Base params with W + scale · B A written into every adapted kernel (fp32 arithmetic, W's dtype)."""
    flat = flatten(adapters)

    def merged(path, leaf):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        ab = flat.get(names[:-1]) if names[-1] == "kernel" else None
        if ab is None:
            return leaf
        d = delta(ab["lora_A"].astype(jnp.float32), ab["lora_B"].astype(jnp.float32))
        return (jnp.asarray(leaf, jnp.float32) + scale_ * d).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(merged, base)


def _lora_branch(module, x, a, b, scale_: float, dropout: float, rng):
    """scale · B A dropout(x) of one Dense/Conv ``module`` in its compute dtype."""
    dtype = module.dtype or x.dtype
    if rng is not None and dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, zlib.crc32("/".join(module.path).encode())),
                                    1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0)
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    if a.ndim == 2:
        h = x @ a
    else:
        strides = module.strides if module.strides is not None else 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        padding = module.padding if isinstance(module.padding, str) else tuple(tuple(p) for p in module.padding)
        h = jax.lax.conv_general_dilated(x, a, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (scale_ * (h @ b)).astype(dtype)


def apply(module: nn.Module, params, *args, policy_rows: int | None = None, **kwargs):
    """``module.apply({'params': params}, *args)``; for a ``LoraParams`` policy each adapted layer adds its
    LoRA branch to the frozen layer's output (a Flax method interceptor; the module is unchanged).

    policy_rows: the branch is added to the first ``policy_rows`` rows of the batch only, the others run the
    base alone: the policy and its reference (the base) in one call on a stacked batch."""
    if not isinstance(params, LoraParams):
        return module.apply({"params": params}, *args, **kwargs)
    flat = flatten(params.adapters)

    def interceptor(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        layer = context.module
        if context.method_name != "__call__" or not isinstance(layer, (nn.Dense, nn.Conv)):
            return out
        ab = flat.get(tuple(layer.path))
        if ab is None:
            return out
        x = call_args[0] if call_args else call_kwargs["inputs"]
        if policy_rows is None:
            return out + _lora_branch(layer, x, ab["lora_A"], ab["lora_B"], params.scale, params.dropout, params.rng)
        branch = _lora_branch(layer, x[:policy_rows], ab["lora_A"], ab["lora_B"], params.scale, params.dropout,
                              params.rng)
        return out.at[:policy_rows].add(branch)

    with nn.intercept_methods(interceptor):
        return module.apply({"params": params.base}, *args, **kwargs)


def count(adapters) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(adapters)))


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT LoRA files: ``pytorch_lora_weights.safetensors`` with keys
# ``unet.<module>.lora_A.weight`` [r, in] (conv [r, in, kh, kw]) and ``unet.<module>.lora_B.weight``
# [out, r] (conv [out, r, 1, 1]); r and α in the ``lora_adapter_metadata`` JSON of the header, as
# ``StableDiffusionPipeline.save_lora_weights`` writes them (no metadata: α = r, the diffusers convention).

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("unet.", "base_model.model.")   # diffusers pipeline files; PEFT's own get_peft_model_state_dict


def to_peft_state_dict(adapters, prefix: str = "unet.") -> dict[str, np.ndarray]:
    """Torch-named, torch-laid-out fp32 arrays of an adapter tree."""
    out = {}
    for path, ab in flatten(adapters).items():
        a, b = (np.asarray(jax.device_get(ab[k]), np.float32) for k in ("lora_A", "lora_B"))
        name = prefix + module_name(path)
        if a.ndim == 4:
            out[f"{name}.lora_A.weight"] = a.transpose(3, 2, 0, 1)         # [kh, kw, in, r] -> [r, in, kh, kw]
            out[f"{name}.lora_B.weight"] = b.T[:, :, None, None]           # [r, out] -> [out, r, 1, 1]
        else:
            out[f"{name}.lora_A.weight"] = a.T
            out[f"{name}.lora_B.weight"] = b.T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_diffusers_lora(folder: str, adapters, rank: int, alpha: float) -> str:
    """Writes ``folder/pytorch_lora_weights.safetensors`` (loadable by diffusers' ``load_lora_weights``)."""
    tensors = to_peft_state_dict(adapters)
    targets = sorted(module_name(p) for p in flatten(adapters))
    meta = {"unet.r": int(rank), "unet.lora_alpha": float(alpha), "unet.target_modules": targets,
            "unet.lora_dropout": 0.0, "unet.bias": "none", "unet.use_rslora": False, "unet.use_dora": False,
            "unet.rank_pattern": {}, "unet.alpha_pattern": {}}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_NAME)
    weights.write_safetensors(path, tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def _read_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def load_diffusers_lora(path: str, unet_params) -> tuple[dict, int, float]:
    """(adapters, rank, alpha) of a diffusers/PEFT LoRA file (or the folder holding ``WEIGHT_NAME``) for a UNet
    with params ``unet_params`` (arrays or ShapeDtypeStructs). Raises ValueError naming the file and the key."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    tensors = weights.read_safetensors(path)
    kernels = {module_name(p[:-1]): (p[:-1], tuple(x.shape)) for p, x in
               ((tuple(getattr(k, "key", str(k)) for k in kp), x)
                for kp, x in jax.tree_util.tree_flatten_with_path(unet_params)[0]) if p[-1] == "kernel"}
    flat, errors, ranks = {}, [], set()
    for key, value in tensors.items():
        name = key
        for prefix in _PREFIXES:
            name = name[len(prefix):] if name.startswith(prefix) else name
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            errors.append(f"{key}: not a PEFT LoRA tensor (<module>.lora_A.weight / .lora_B.weight); old-format or "
                          "text-encoder LoRAs are not supported")
            continue
        module, part = name[:-len(".lora_A.weight")], name[-len("lora_A.weight"):-len(".weight")]
        if module not in kernels:
            errors.append(f"{key}: the UNet has no layer {module}")
            continue
        path_, shape = kernels[module]
        arr = np.asarray(value, np.float32)
        if part == "lora_A":
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T     # -> [kh, kw, in, r] / [in, r]
            ranks.add(arr.shape[-1])
            ok = arr.shape[:-1] == shape[:-1]
        else:
            arr = arr.reshape(arr.shape[0], arr.shape[1]).T                 # [out, r(, 1, 1)] -> [r, out]
            ok = arr.shape[1] == shape[-1]
        if not ok:
            errors.append(f"{key}: shape {tuple(value.shape)} does not fit the UNet's {module} kernel {shape}")
            continue
        flat.setdefault(path_, {})[part] = arr
    errors += [f"{module_name(p)}: has only {sorted(ab)}" for p, ab in flat.items() if len(ab) != 2]
    if len(ranks) > 1:
        errors.append(f"ranks {sorted(ranks)}: jaxpref adapters share one rank")
    meta = _read_metadata(path)
    meta = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")} or meta
    if meta.get("use_rslora") or meta.get("use_dora") or meta.get("alpha_pattern") or meta.get("rank_pattern"):
        errors.append("its metadata asks for rsLoRA, DoRA or per-module ranks/alphas, which jaxpref does not train")
    if errors or not flat:
        raise ValueError(f"{path}: not a LoRA of this UNet: " + ("; ".join(errors[:10]) or "no LoRA tensors"))
    rank = ranks.pop()
    return _nest(flat), rank, float(meta.get("lora_alpha", rank))


def initial_adapters(lora_config, unet_params, seed: int) -> dict:
    """A run's starting adapters: ``lora_config.init_from``'s file (its rank, α and modules must be the config's),
    else fresh ones (``init_adapters``)."""
    if not lora_config.init_from:
        return init_adapters(jax.random.PRNGKey(seed), unet_params, lora_config)
    adapters, rank, alpha = load_diffusers_lora(hub.resolve(lora_config.init_from, key="config.lora.init_from",
                                                            components=None), unet_params)
    want = set(target_kernels(unet_params, lora_config.target_modules))
    got = set(flatten(adapters))
    if rank != lora_config.rank or not math.isclose(alpha, lora_config.alpha) or want != got:
        raise ValueError(f"config.lora.init_from={lora_config.init_from!r}: the file has rank {rank}, alpha {alpha} on "
                         f"{len(got)} layers; the config asks rank {lora_config.rank}, alpha {lora_config.alpha} on "
                         f"{len(want)} layers (target_modules {tuple(lora_config.target_modules)}); set "
                         "config.lora.rank, alpha and target_modules to the file's")
    return jax.tree_util.tree_map(jnp.asarray, adapters)
