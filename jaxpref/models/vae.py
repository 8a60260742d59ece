"""diffusers AutoencoderKL (the SD / SDXL VAE) in Flax, channels-last, loading/saving diffusers folders.

Submodules carry the checkpoint's own names (``encoder.down_blocks_0.resnets_1.conv1``), so loading
is the generic rule in ``weights.py`` plus one rename for the legacy attention names
(``query/key/value/proj_attn``) still found in SD1.5-era VAE files.

Latents here are *unscaled*: multiply ``encode``'s sample by ``module.scaling_factor`` before the
UNet and divide by it before ``decode``, as diffusers pipelines do. ``posterior`` is the one way images
become a latent posterior (mean, std): the latent cache, the train feed and the tiny model's trainer use it.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import weights
from jaxpref.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, attention, conv, group_norm

Dtype = Any

WEIGHTS_STEM = "diffusion_pytorch_model"
_EPS = 1e-6  # diffusers hard-codes eps=1e-6 for every VAE norm


class VAEAttention(nn.Module):
    """The VAE's single-head spatial self-attention with residual; x: [B, H, W, C] -> [B, H, W, C]."""
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        hs = group_norm(self.groups, _EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q = nn.Dense(c, name="to_q", **kw)(hs)
        k = nn.Dense(c, name="to_k", **kw)(hs)
        v = nn.Dense(c, name="to_v", **kw)(hs)
        out = attention(q, k, v, num_heads=1, dtype=self.dtype)
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        return x + out.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
    """diffusers UNetMidBlock2D without time embedding: resnet, [attention], resnet."""
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=_EPS, use_time_embedding=False, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, self.param_dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets then (except the last block) a stride-2 conv with the (0, 1) pad."""
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=_EPS, use_time_embedding=False,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets then (except the last block) nearest 2x upsampling + conv."""
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=_EPS, use_time_embedding=False,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels], f = 2^(blocks-1)."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[0], 3, "conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(ch, self.layers_per_block, self.groups, add_downsample=i < last,
                                   name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(self.block_out_channels[-1], self.groups, self.mid_block_add_attention,
                        name="mid_block", **kw)(x)
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * self.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[-1], 3, "conv_in", **kw)(z)
        x = VAEMidBlock(self.block_out_channels[-1], self.groups, self.mid_block_add_attention,
                        name="mid_block", **kw)(x)
        reversed_channels = self.block_out_channels[::-1]
        last = len(reversed_channels) - 1
        for i, ch in enumerate(reversed_channels):
            x = UpDecoderBlock2D(ch, self.layers_per_block + 1, self.groups, add_upsample=i < last,
                                 name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL; fields mirror its config.json (see ``vae_from_config``).

    ``apply(params, images, method=AutoencoderKL.encode)`` / ``method=AutoencoderKL.decode``;
    ``__call__`` (encode -> mean -> decode) exists for ``init``.
    """
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block, self.latent_channels,
                               self.norm_num_groups, self.mid_block_add_attention, **kw)
        self.decoder = Decoder(tuple(self.block_out_channels), self.layers_per_block, self.out_channels,
                               self.norm_num_groups, self.mid_block_add_attention, **kw)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), **kw)

    def encode(self, images):
        """images [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels] fp32.

        logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        moments = self.encoder(images.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C] fp32 (about [-1, 1])."""
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def to_unit_range(images):
    """uint8 pixels [0, 255] -> float32 [-1, 1] (x / 127.5 - 1), the VAE's input range."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def posterior(vae: AutoencoderKL, params, images):
    """The VAE posterior of images: (mean, std), each [B, h, w, latent_channels] float32, unscaled.

    images: uint8 [B, H, W, C] (mapped by ``to_unit_range``) or floats already in [-1, 1]. std is
    exp(logvar / 2) of ``AutoencoderKL.encode``'s logvar, which is already clipped to [-30, 20]. Not
    jitted: call it inside your own ``jax.jit`` (``vae`` is a static Flax module).
    """
    x = to_unit_range(images) if jnp.issubdtype(images.dtype, jnp.integer) else images
    mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return mean, jnp.exp(0.5 * logvar)


# ---------------------------------------------------------------------------------------------
# Config.

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# config.json key -> AutoencoderKL field (lists become tuples).
_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
           "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
           "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
_CHECKED = {"down_block_types", "up_block_types", "act_fn"}


def _unsupported(key, value, supported):
    return ValueError(f"AutoencoderKL config: {key}={value!r} is not supported (supported: {supported})")


def vae_from_config(config: dict, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> AutoencoderKL:
    """Builds our AutoencoderKL from a diffusers config dict, refusing anything we would get wrong.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are metadata and ignored.
    """
    fields = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in _FIELDS:
            fields[key] = tuple(value) if isinstance(value, list) else value
        elif key not in _CHECKED:
            raise ValueError(f"AutoencoderKL config: unknown key {key!r} (value {value!r}); known keys: "
                             f"{sorted(_FIELDS + tuple(_CHECKED))}")
    n = len(fields.get("block_out_channels", AutoencoderKL.block_out_channels))
    if config.get("act_fn", "silu") != "silu":
        raise _unsupported("act_fn", config["act_fn"], ["silu"])
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = list(config.get(key, [block] * n))
        if any(t != block for t in types):
            raise _unsupported(key, types, f"only {block} blocks")
        if len(types) != n:
            raise ValueError(f"AutoencoderKL config: {key} has {len(types)} entries but block_out_channels has {n}")
    groups = fields.get("norm_num_groups", AutoencoderKL.norm_num_groups)
    for ch in fields.get("block_out_channels", AutoencoderKL.block_out_channels):
        if ch % groups:
            raise _unsupported("block_out_channels", fields["block_out_channels"],
                               f"channel counts divisible by norm_num_groups={groups}")
    if isinstance(fields.get("sample_size"), tuple):
        fields["sample_size"] = fields["sample_size"][0]
    return AutoencoderKL(**fields, dtype=dtype, param_dtype=param_dtype)


def vae_config(module: AutoencoderKL) -> dict:
    """The diffusers config.json of ``module``."""
    n = len(module.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
              "down_block_types": [_DOWN_BLOCK] * n, "up_block_types": [_UP_BLOCK] * n}
    for key in _FIELDS:
        value = getattr(module, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    return config


# ---------------------------------------------------------------------------------------------
# Loading / saving diffusers folders.

_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy(key: str) -> str:
    """Old diffusers VAE attention names (still in SD1.5 files) -> today's ``to_q/to_k/to_v/to_out.0``."""
    return _LEGACY_ATTENTION.sub(lambda m: m.group(1) + _LEGACY_TO_NEW[m.group(2)] + ".", key)


def param_shapes(module: AutoencoderKL):
    """The param tree of ShapeDtypeStructs, without allocating anything."""
    side = 2 ** (len(module.block_out_channels) - 1)
    images = jax.ShapeDtypeStruct((1, side, side, module.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)["params"]


def load_vae(folder: str, dtype: Dtype = jnp.float32) -> tuple[AutoencoderKL, Any]:
    """Reads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    ``dtype`` is the compute dtype; params stay fp32. Returns (module, params).
    """
    module = vae_from_config(weights.read_config(folder), dtype=dtype)
    tensors, source = weights.read_checkpoint_folder(folder, WEIGHTS_STEM)
    params = weights.convert_torch_to_flax(tensors, param_shapes(module), source, dtype=np.float32,
                                           rename=_rename_legacy)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def save_vae(folder: str, module: AutoencoderKL, params) -> None:
    """Writes a folder ``diffusers.AutoencoderKL.from_pretrained`` loads (fp32 safetensors)."""
    params = params.get("params", params)  # accept init()'s {"params": ...} too
    weights.write_config(folder, vae_config(module))
    tensors = weights.convert_flax_to_torch(params, dtype=np.float32)
    weights.write_safetensors(f"{folder}/{WEIGHTS_STEM}.safetensors", tensors)
