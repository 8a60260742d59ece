"""Our Flax UNet2DConditionModel (SD1.5 / SD2 / SDXL), parity-tested against PyTorch diffusers.

Channels-last: latents [B, H, W, C]. Every submodule carries diffusers' own name (``down_blocks_0``
is ``down_blocks.0``), so a diffusers checkpoint loads by the naming rule of ``weights.py``.
Params are stored in ``param_dtype`` (fp32); ``dtype`` is the compute dtype (bf16 for training).

Reading order: time embeddings, transformer, blocks, the UNet, then ``unet_from_config`` / ``load_unet`` /
``save_unet`` / ``unet_param_shapes``. The public checkpoints' configs are in ``jaxpref.models.presets``.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import weights
from jaxpref.models.layers import (Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm,
                                   layer_norm)

Dtype = Any
IntOrSeq = Union[int, tuple[int, ...]]

# ---------------------------------------------------------------------------------------------
# Time embeddings.


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000):
    """diffusers ``get_timestep_embedding`` (DDPM sinusoids); timesteps: [N] -> [N, dim] fp32.

    The frequencies are constants computed on the host as torch does (fp32 exponent, then exp): XLA's
    exp and its division-by-constant differ from torch's by an ulp, which at t ~ 1000 shifts the
    phase by ~1e-4. What remains is torch's own exp rounding (1 ulp on 2 of 160 frequencies).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2; x: [B, D_in] -> [B, D]."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.features, name="linear_1", **kw)(x)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(x))


# ---------------------------------------------------------------------------------------------
# Transformer (spatial self-attention + cross-attention on the text).


class GEGLU(nn.Module):
    """proj to 2 * features, then value * gelu(gate) (exact erf GELU, as torch's F.gelu)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: net.0 (GEGLU to 4C), net.1 dropout (none), net.2 back to C."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention on ``context``, GEGLU MLP; x: [B, T, C]."""
    heads: int
    dim_head: int
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, implementation=self.attention_impl, **kw)
        x = x + Attention(name="attn1", **attn)(layer_norm(1e-5, name="norm1", **kw)(x))
        x = x + Attention(name="attn2", **attn)(layer_norm(1e-5, name="norm2", **kw)(x), context)
        return x + FeedForward(name="ff", **kw)(layer_norm(1e-5, name="norm3", **kw)(x))


def convs_and_projections_saveable(prim, *args, **params) -> bool:
    """Keeps convolution outputs and weight matmuls' outputs, not attention's batched logits and values."""
    return (prim is jax.lax.conv_general_dilated_p
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# What a rematerialised block keeps from its forward pass: "nothing_saveable" recomputes every activation
# (least memory), "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs (the projections, not
# attention's batched logits), "convs_and_projections_saveable" those and every convolution's output (the
# ResNet blocks' FLOPs), "dots_saveable" every matmul's and convolution's output, attention's logits included.
REMAT_POLICIES = {
    "nothing_saveable": None,  # nn.remat's default
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "convs_and_projections_saveable": convs_and_projections_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@functools.lru_cache(maxsize=None)
def rematerialized(cls, policy: str = "nothing_saveable"):
    """``cls``'s twin (same names and params) whose activations are recomputed in the backward pass except
    those ``policy`` saves (``REMAT_POLICIES``)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {tuple(REMAT_POLICIES)}")
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, ``num_layers`` BasicTransformerBlocks over the H*W tokens, proj_out, residual.

    x: [B, H, W, C], context: [B, S, C_ctx] -> [B, H, W, C]. proj_in/out are 1x1 convs (SD1.5) or
    Dense layers (``use_linear_projection``, SD2/SDXL); the two are the same map, stored differently.
    """
    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    remat: bool = False
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        dim_head = c // self.heads
        inner = self.heads * dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, "proj_in", padding=0, **kw)(x).reshape(b, h * w, inner)
        block = rematerialized(BasicTransformerBlock, self.remat_policy) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            x = block(self.heads, dim_head, self.attention_impl, name=f"transformer_blocks_{i}", **kw)(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", padding=0, **kw)(x.reshape(b, h, w, inner))
        return x + residual


# ---------------------------------------------------------------------------------------------
# UNet blocks. A down block hands its skips (one per resnet, one after the downsampler) to the
# mirrored up block, which consumes them last-in first-out, one per resnet.


class _BlockBase(nn.Module):
    """Fields shared by the down/mid/up blocks."""
    out_channels: int
    num_layers: int
    groups: int = 32
    eps: float = 1e-5
    cross_attention: bool = False
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    remat: bool = False
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "nothing_saveable"

    def resnet(self, name: str, output_scale_factor: float = 1.0):
        cls = rematerialized(ResnetBlock2D, self.remat_policy) if self.remat else ResnetBlock2D
        return cls(self.out_channels, groups=self.groups, eps=self.eps, output_scale_factor=output_scale_factor,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def transformer(self, name: str):
        return Transformer2DModel(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
                                  self.remat, self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                                  remat_policy=self.remat_policy, name=name)


class DownBlock2D(_BlockBase):
    """diffusers DownBlock2D, or CrossAttnDownBlock2D when ``cross_attention``.

    x: [B, H, W, C_in] -> (x: [B, H', W', C], skips: num_layers (+1 with a downsampler) tensors).
    """
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_BlockBase):
    """resnet, then ``num_layers`` x (transformer, resnet); x: [B, H, W, C] -> same."""
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock2D(_BlockBase):
    """diffusers UpBlock2D, or CrossAttnUpBlock2D when ``cross_attention``.

    x: [B, H, W, C_prev], skips: the last ``num_layers`` skips of the down path ->
    [B, 2H, 2W, C] (or ``upsample_size``; no upsampling in the last block).
    """
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context=None, upsample_size=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet.


def _per_block(value, n: int) -> tuple:
    """An int (or a one-value list) for every block, or a per-block list, as a tuple of n."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class UNet2DConditionModel(nn.Module):
    """diffusers UNet2DConditionModel (the SD1.5 / SD2 / SDXL subset), channels-last.

    Field names and defaults are diffusers' config keys, except ``num_attention_heads``: the number of
    heads per block, which diffusers configs spell ``attention_head_dim`` (see ``unet_from_config``).
    ``remat`` checkpoints every resnet and transformer block (same param names), keeping what
    ``remat_policy`` saves.
    ``attention_impl``: a backend of ``jaxpref.models.attention`` ('auto', 'xla', 'cudnn', 'chunked';
    None: 'xla').
    """
    sample_size: Optional[int] = None  # metadata: the latent side the checkpoint was trained at
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrSeq = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrSeq = 1
    num_attention_heads: IntOrSeq = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # recorded only: our attention softmax is always fp32
    addition_embed_type: Optional[str] = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    remat_policy: str = "nothing_saveable"  # with remat: what each block keeps (REMAT_POLICIES)

    # -- derived sizes --

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def config(self) -> dict:
        """The diffusers ``config.json`` of this module (``UNet2DConditionModel.from_pretrained`` reads it)."""
        out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
               **_DIFFUSERS_ONLY_DEFAULTS}
        for key in _FIELD_KEYS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        heads = self.num_attention_heads  # diffusers' legacy name for the number of heads
        out["attention_head_dim"] = list(heads) if isinstance(heads, tuple) else heads
        out["num_attention_heads"] = None
        return out

    def dummy_inputs(self, batch: int = 1, side: Optional[int] = None):
        """Zero inputs of the right shapes for ``init`` / ``eval_shape`` (side defaults to the smallest valid)."""
        side = side or 2 ** self.num_upsamplers
        args = (jnp.zeros((batch, side, side, self.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch, 1, self.cross_attention_dim), jnp.float32))
        added = None
        if self.addition_embed_type == "text_time":
            text_dim = self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, text_dim), jnp.float32),
                     "time_ids": jnp.zeros((batch, 6), jnp.float32)}
        return (*args, added)

    # -- forward --

    def _time_embedding(self, timesteps, batch: int, added_cond_kwargs):
        """[B, time_embed_dim] from the timesteps (+ SDXL's pooled text and size/crop ids)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        emb = TimestepEmbedding(self.time_embed_dim, name="time_embedding", **kw)(t_emb)
        if self.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("addition_embed_type='text_time' (SDXL) needs added_cond_kwargs with 'text_embeds' "
                                 "[B, D] (pooled text) and 'time_ids' [B, 6] (original size, crop, target size)")
            text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
            time_ids = jnp.asarray(added_cond_kwargs["time_ids"]).reshape(-1)
            time_embeds = timestep_embedding(time_ids, self.addition_time_embed_dim, self.flip_sin_to_cos,
                                             self.freq_shift).reshape(batch, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + TimestepEmbedding(self.time_embed_dim, name="add_embedding", **kw)(add)
        return emb

    @nn.compact
    def __call__(self, latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        """Predicts the noise (or v).

        Args:
          latents: [B, H, W, in_channels].
          timesteps: scalar or [B], int or float.
          encoder_hidden_states: [B, S, cross_attention_dim] text embeddings.
          added_cond_kwargs: SDXL only: {'text_embeds': [B, D], 'time_ids': [B, 6]}.
        Returns:
          [B, H, W, out_channels] float32.
        """
        n = len(self.block_out_channels)
        channels = self.block_out_channels
        heads = _per_block(self.num_attention_heads, n)
        layers = _per_block(self.layers_per_block, n)
        tlayers = _per_block(self.transformer_layers_per_block, n)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(groups=self.norm_num_groups, eps=self.norm_eps, remat=self.remat,
                        remat_policy=self.remat_policy, use_linear_projection=self.use_linear_projection,
                        attention_impl=self.attention_impl, **kw)
        b, height, width, c = latents.shape
        context = jnp.asarray(encoder_hidden_states)
        if c != self.in_channels or context.ndim != 3 or context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"UNet2DConditionModel expects latents [B, H, W, {self.in_channels}] and "
                             f"encoder_hidden_states [B, S, {self.cross_attention_dim}]; got {latents.shape} and "
                             f"{context.shape}")

        emb = self._time_embedding(timesteps, b, added_cond_kwargs)
        x = 2 * latents - 1.0 if self.center_input_sample else latents
        x = conv(channels[0], self.conv_in_kernel, "conv_in", padding=(self.conv_in_kernel - 1) // 2, **kw)(x)

        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, block_skips = DownBlock2D(
                channels[i], layers[i], cross_attention=kind == "CrossAttnDownBlock2D", heads=heads[i],
                transformer_layers=tlayers[i], add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}", **block_kw)(x, emb, context)
            skips.extend(block_skips)

        if self.mid_block_type is not None:
            x = UNetMidBlock2DCrossAttn(
                channels[-1], 1, cross_attention=True, heads=heads[-1], transformer_layers=tlayers[-1],
                output_scale_factor=self.mid_block_scale_factor, name="mid_block", **block_kw)(x, emb, context)

        # An input side that is not a multiple of 2**num_upsamplers: each upsampler resizes to its skip.
        odd_size = height % 2 ** self.num_upsamplers or width % 2 ** self.num_upsamplers
        for i, kind in enumerate(self.up_block_types):
            j = n - 1 - i  # the mirrored down block
            num = layers[j] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            upsample_size = skips[-1].shape[1:3] if odd_size and i < n - 1 else None
            x = UpBlock2D(
                channels[j], num, cross_attention=kind == "CrossAttnUpBlock2D", heads=heads[j],
                transformer_layers=tlayers[j], add_upsample=i < n - 1, name=f"up_blocks_{i}",
                **block_kw)(x, block_skips, emb, context, upsample_size)

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv(self.out_channels, self.conv_out_kernel, "conv_out", padding=(self.conv_out_kernel - 1) // 2, **kw)(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# diffusers config <-> module.

_DIFFUSERS_VERSION = "0.42.1"  # the release our parity tests run against
_METADATA_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_FIELD_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "use_linear_projection", "upcast_attention", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "time_embedding_dim", "conv_in_kernel",
    "conv_out_kernel",
)
# Keys of features we do not implement: accepted at diffusers' default (or an equivalent) only.
_DIFFUSERS_ONLY_DEFAULTS = {
    "act_fn": "silu", "only_cross_attention": False, "dropout": 0.0, "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "attention_type": "default", "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
_EQUIVALENT = {"act_fn": ("silu", "swish"), "mid_block_only_cross_attention": (None, False)}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def unet_from_config(config: Mapping[str, Any], *, source: str = "unet config",
                     **module_kwargs) -> UNet2DConditionModel:
    """Builds our module from a diffusers ``unet/config.json`` dict.

    Missing keys take diffusers' defaults. ``attention_head_dim`` is, as in diffusers, the NUMBER of
    heads per block unless ``num_attention_heads`` is given. A key we cannot honour (a block type,
    embedding or norm variant we do not implement) or do not know raises ValueError naming it.
    ``module_kwargs`` set non-config fields (dtype, param_dtype, remat, attention_impl).
    """
    def fail(key, value, supported):
        raise ValueError(f"{source}: {key}={value!r} is not supported by jaxpref's UNet2DConditionModel; "
                         f"supported: {supported}")

    unknown = sorted(set(config) - set(_FIELD_KEYS) - set(_DIFFUSERS_ONLY_DEFAULTS) - _METADATA_KEYS
                     - {"attention_head_dim", "num_attention_heads"})
    if unknown:
        raise ValueError(f"{source}: unknown UNet config keys {unknown}; known keys are diffusers' "
                         f"UNet2DConditionModel arguments: {sorted(set(_FIELD_KEYS) | set(_DIFFUSERS_ONLY_DEFAULTS))}")
    for key, default in _DIFFUSERS_ONLY_DEFAULTS.items():
        value = config.get(key, default)
        if key == "only_cross_attention" and isinstance(value, (list, tuple)) and not any(value):
            continue
        if value not in _EQUIVALENT.get(key, (default,)):
            fail(key, value, f"{_EQUIVALENT.get(key, (default,))[0]!r} only")

    fields = {k: config[k] for k in _FIELD_KEYS if k in config}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    fields["num_attention_heads"] = tuple(heads) if isinstance(heads, (list, tuple)) else heads
    fields["upcast_attention"] = bool(fields.get("upcast_attention"))  # SDXL writes null

    module = UNet2DConditionModel(**fields, **module_kwargs)
    n = len(module.block_out_channels)
    for key, types, allowed in (("down_block_types", module.down_block_types, _DOWN_TYPES),
                                ("up_block_types", module.up_block_types, _UP_TYPES)):
        for t in types:
            if t not in allowed:
                fail(key, list(types), f"{list(allowed)} per block")
        if len(types) != n:
            raise ValueError(f"{source}: {key} has {len(types)} entries but block_out_channels has {n}")
    if module.mid_block_type not in _MID_TYPES:
        fail("mid_block_type", module.mid_block_type, list(_MID_TYPES))
    if module.addition_embed_type not in (None, "text_time"):
        fail("addition_embed_type", module.addition_embed_type, "None or 'text_time' (SDXL)")
    if module.addition_embed_type == "text_time" and not (module.addition_time_embed_dim
                                                          and module.projection_class_embeddings_input_dim):
        raise ValueError(f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                         "projection_class_embeddings_input_dim")
    if module.norm_num_groups is None:
        fail("norm_num_groups", None, "an int (GroupNorm everywhere)")
    cad = module.cross_attention_dim
    if isinstance(cad, tuple):  # one text encoder feeds every block, so a per-block list must be constant
        if len(set(cad)) != 1:
            fail("cross_attention_dim", list(cad), "one value for all blocks")
        module = module.clone(cross_attention_dim=cad[0])
    for key in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads"):
        value = getattr(module, key)
        if isinstance(value, tuple):
            if len(value) != n or not all(isinstance(v, int) for v in value):
                shown = "attention_head_dim" if key == "num_attention_heads" else key
                fail(shown, list(value), f"an int or a list of {n} ints (one per block)")
    return module


# ---------------------------------------------------------------------------------------------
# Checkpoints.

_WEIGHTS_STEM = "diffusion_pytorch_model"

def unet_param_shapes(module_or_config: Union[UNet2DConditionModel, Mapping[str, Any]]):
    """The param tree as ShapeDtypeStructs, by ``jax.eval_shape`` of the init: nothing is allocated."""
    module = module_or_config if isinstance(module_or_config, nn.Module) else unet_from_config(module_or_config)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *module.dummy_inputs()))["params"]


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def load_unet(folder: str, dtype: Dtype = jnp.float32, variant: Optional[str] = None):
    """Loads a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``
    or its sharded index) -> (module, params). Params are fp32; ``dtype`` is the compute dtype.

    ``module.clone(remat=True, attention_impl='cudnn')`` switches the non-config options.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such UNet folder (expected a diffusers 'unet' folder with config.json and "
                         f"{_WEIGHTS_STEM}.safetensors)")
    config_path = os.path.join(folder, "config.json")
    module = unet_from_config(weights.read_config(folder), source=config_path, dtype=dtype)
    tensors, source = weights.read_checkpoint_folder(folder, _WEIGHTS_STEM, variant)
    params = weights.convert_torch_to_flax(tensors, unet_param_shapes(module), source, dtype=np.float32)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def _torch_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{torch key: Flax shape} of a param tree."""
    return {weights.torch_key(tuple(k.key for k in path)): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_unet(folder: str, module: UNet2DConditionModel, params) -> None:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable by diffusers'
    ``UNet2DConditionModel.from_pretrained(folder)`` and by ``load_unet``.

    Raises ValueError (before writing anything) if ``params`` do not fit ``module``.
    """
    expected, got = _torch_shapes(unet_param_shapes(module)), _torch_shapes(params)
    errors = [f"tensor {k}: params have shape {got.get(k)}, the module expects {expected.get(k)}"
              for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    if errors:
        raise ValueError(f"{folder}: params do not match the module config:\n  " + "\n  ".join(errors[:20]))
    os.makedirs(folder, exist_ok=True)
    weights.write_config(folder, module.config)
    tensors = weights.convert_flax_to_torch(params)
    weights.write_safetensors(os.path.join(folder, f"{_WEIGHTS_STEM}.safetensors"), tensors)
