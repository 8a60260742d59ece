"""Building blocks shared by the UNet and the VAE, named as diffusers names them (channels-last).

Every module takes ``dtype`` (compute) and ``param_dtype`` (storage) so params stay fp32 while the
arithmetic runs in bf16.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxpref.models import attention as attention_lib

Dtype = Any


def attention(q, k, v, num_heads: int, dtype: Dtype = jnp.float32, implementation: Optional[str] = None):
    """Multi-head scaled dot-product attention; q: [B, T, D], k/v: [B, S, D] -> [B, T, D].

    ``implementation`` is a backend of ``jaxpref.models.attention`` (None: 'xla'). Every backend takes the
    logits and the softmax in fp32 whatever ``dtype`` is (diffusers' ``upcast_attention`` always on).
    """
    b, t, d = q.shape
    s = k.shape[1]
    head_dim = d // num_heads
    q = q.reshape(b, t, num_heads, head_dim).astype(dtype)
    k = k.reshape(b, s, num_heads, head_dim).astype(dtype)
    v = v.reshape(b, s, num_heads, v.shape[-1] // num_heads).astype(dtype)
    out = attention_lib.dot_product_attention(q, k, v, implementation or "xla")
    return out.reshape(b, t, -1)


def group_norm(num_groups: int, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """An ``nn.GroupNorm`` whose params land directly under ``name`` (weight/bias in torch).

    Two-pass variance (as torch): the one-pass E[x^2] - E[x]^2 loses digits when |mean| >> std.
    """
    return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """An ``nn.LayerNorm`` with torch's two-pass variance."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        name=name)


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
         padding: int | str | None = None, use_bias: bool = True):
    """An ``nn.Conv`` with torch's symmetric padding (``kernel // 2`` unless given)."""
    pad = kernel // 2 if padding is None else padding
    padding_arg = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding_arg,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm='default'); x: [B, H, W, C]."""
    out_channels: int
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-5
    use_time_embedding: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        h = group_norm(self.groups, self.eps, name="norm1", **kw)(x)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        if self.use_time_embedding and temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups_out or self.groups, self.eps, name="norm2", **kw)(h)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if residual.shape[-1] != self.out_channels:
            residual = conv(self.out_channels, 1, "conv_shortcut", padding=0, **kw)(residual)
        return (residual + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` (UNet) or ``0`` with diffusers' asymmetric (0, 1) pad (VAE)."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, "conv", stride=2, padding=self.padding, dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """torch's ``interpolate(mode='nearest', size=...)`` source index: floor(i * in/out) in fp32."""
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, size_in - 1)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv; x: [B, H, W, C] -> [B, 2H, 2W, C].

    ``output_size=(H', W')`` resizes to that size instead (the UNet asks for it when the input side
    is not a multiple of its total downsampling, so the skips line up).
    """
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Optional[tuple[int, int]] = None):
        b, h, w, c = x.shape
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        else:
            x = x[:, _nearest_index(h, output_size[0])][:, :, _nearest_index(w, output_size[1])]
        return conv(self.out_channels, 3, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Attention(nn.Module):
    """diffusers ``Attention`` (to_q, to_k, to_v, to_out.0): self-attention, or cross-attention on ``context``.

    x: [B, T, C], context: [B, S, C_ctx] (None: x) -> [B, T, C].
    """
    heads: int
    dim_head: int
    qkv_bias: bool = False
    implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context)
        out = attention(q, k, v, self.heads, self.dtype, self.implementation)
        return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out)
