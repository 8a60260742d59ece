"""BLIP's two towers in Flax: the ViT image encoder and the BERT text encoder with cross-attention.

BLIP (Li et al. 2022; salesforce/BLIP ``models/vit.py`` and ``models/med.py``, as THUDM's ImageReward
ships them) scores an image-text pair by running the text through BERT layers that each add a
cross-attention block over the image tokens ("multimodal" mode), then reading token 0's state.

- ``VisionTransformer`` (timm-style ViT): patch conv with bias, class token, learned positions, pre-LN
  blocks (one fused ``qkv`` Linear, exact GELU MLP), LayerNorm eps 1e-6 at the end; all tokens out.
- ``BertModel``: word + absolute position embeddings (no token types) and LayerNorm; post-LN layers of
  self-attention (padding mask as BERT's additive -10000), cross-attention (keys/values from the
  image width) and the GELU feed-forward; no pooler.

Module names are the torch state dict's (``blocks_3.attn.qkv`` <-> ``blocks.3.attn.qkv``,
``encoder.layer_0.crossattention.self.query``), so ``weights.convert_torch_to_flax`` maps them.
Images are channels-last [B, H, W, 3], already normalized.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BERT_MASK_VALUE = -10000.0  # med.py's additive mask for padding keys (not -inf)
BLIP_HEAD_DIM = 64  # BLIP's ViT-B/16 and ViT-L/16 both use 64-wide heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """BLIP's ``create_vit('large', 224)`` by default."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The fields of ``med_config.json`` (a BertConfig) that change the forward pass; BERT-base defaults."""
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12


# med_config keys that leave an inference forward pass unchanged (dropout is off in eval; BLIP's
# embeddings have no token types; encoder_width is replaced by the ViT's width, as BLIP_Pretrain does).
_INERT_MED_KEYS = frozenset({
    "architectures", "model_type", "attention_probs_dropout_prob", "hidden_dropout_prob", "initializer_range",
    "pad_token_id", "type_vocab_size", "encoder_width", "transformers_version", "torch_dtype", "dtype",
    "gradient_checkpointing", "use_cache", "classifier_dropout", "bos_token_id", "eos_token_id"})
_FIXED_MED_VALUES = {"hidden_act": ("gelu",), "position_embedding_type": ("absolute",),
                     "add_cross_attention": (True,), "is_decoder": (False,)}


def text_config_from_med(config: Mapping[str, Any], source: str = "med_config.json") -> TextConfig:
    """Our ``TextConfig`` from a BLIP ``med_config.json`` dict; unknown keys or values -> ValueError."""
    names = {f.name for f in dataclasses.fields(TextConfig)}
    fields = {}
    for key, value in config.items():
        if key in names:
            fields[key] = value
        elif key in _FIXED_MED_VALUES:
            if value not in _FIXED_MED_VALUES[key]:
                raise ValueError(f"{source}: {key}={value!r} is not supported (supported: {_FIXED_MED_VALUES[key]})")
        elif key not in _INERT_MED_KEYS:
            raise ValueError(f"{source}: unknown key {key!r}; known keys: {sorted(names | set(_FIXED_MED_VALUES))}")
    if not config.get("add_cross_attention", False):
        raise ValueError(f"{source}: add_cross_attention must be true (the text encoder attends to the image)")
    parsed = TextConfig(**fields)
    if parsed.hidden_size % parsed.num_attention_heads:
        raise ValueError(f"{source}: hidden_size={parsed.hidden_size} is not divisible by "
                         f"num_attention_heads={parsed.num_attention_heads}")
    return parsed


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def _attend(q, k, v, num_heads: int, bias=None):
    """q [B, T, D], k/v [B, S, D] -> softmax(q k^T / sqrt(d) + bias) v, heads split and merged."""
    b, t, d = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, d // num_heads)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), bias=bias)
    return out.reshape(b, t, d)


# ---------------------------------------------------------------------------------------------
# Image tower (vit.py).

class ViTAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = jnp.split(nn.Dense(3 * d, name="qkv", **kw)(x), 3, axis=-1)
        return nn.Dense(d, name="proj", **kw)(_attend(q, k, v, self.num_heads))


class ViTMlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(_gelu(nn.Dense(self.hidden, name="fc1", **kw)(x)))


class ViTBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + ViTAttention(c.num_heads, name="attn", **kw)(_layer_norm(c.layer_norm_eps, "norm1", **kw)(x))
        hidden = int(c.width * c.mlp_ratio)
        return x + ViTMlp(hidden, name="mlp", **kw)(_layer_norm(c.layer_norm_eps, "norm2", **kw)(x))


class PatchEmbed(nn.Module):
    width: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="proj", dtype=self.dtype,
                    param_dtype=self.param_dtype)(pixels)
        return x.reshape(x.shape[0], -1, self.width)  # row-major patches, as torch's flatten(2)


class VisionTransformer(nn.Module):
    """pixels [B, S, S, 3] -> image tokens [B, 1 + (S/p)^2, width] (class token first, after ``norm``)."""
    config: VisionConfig = VisionConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixels.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"BLIP ViT: images of {pixels.shape[1:3]} px; the model takes {c.image_size}")
        x = PatchEmbed(c.width, c.patch_size, name="patch_embed", **kw)(pixels.astype(self.dtype))
        init = nn.initializers.normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, c.width), self.param_dtype)
        pos_embed = self.param("pos_embed", init, (1, c.num_patches + 1, c.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, c.width)), x], axis=1)
        x = x + pos_embed.astype(x.dtype)
        for i in range(c.depth):
            x = ViTBlock(c, name=f"blocks_{i}", **kw)(x)
        return _layer_norm(c.layer_norm_eps, "norm", **kw)(x)


# ---------------------------------------------------------------------------------------------
# Text tower (med.py, BertModel in "multimodal" mode).

class BertSelfAttention(nn.Module):
    """Queries from ``x``, keys/values from ``context`` (``x`` itself for self-attention)."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, bias=None):
        d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(d, name="query", **kw)(x)
        k, v = nn.Dense(d, name="key", **kw)(context), nn.Dense(d, name="value", **kw)(context)
        return _attend(q, k, v, self.num_heads, bias)


class BertAttention(nn.Module):
    """Post-LN: LayerNorm(dense(attention) + x)."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, bias=None):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = BertSelfAttention(c.num_attention_heads, name="self", **kw)(x, context, bias)
        return BertOutput(c, name="output", **kw)(h, x)


class BertOutput(nn.Module):
    """LayerNorm(dense(h) + residual): closes both attention blocks and the feed-forward."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.config.hidden_size, name="dense", **kw)(h)
        return _layer_norm(self.config.layer_norm_eps, "LayerNorm", **kw)(h + residual)


class BertIntermediate(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _gelu(nn.Dense(self.config.intermediate_size, name="dense", dtype=self.dtype,
                              param_dtype=self.param_dtype)(x))


class BertLayer(nn.Module):
    """Self-attention (padding bias), cross-attention to the image tokens, feed-forward."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_tokens, pad_bias):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(c, name="attention", **kw)(x, x, pad_bias)
        x = BertAttention(c, name="crossattention", **kw)(x, image_tokens)  # every image token attended
        return BertOutput(c, name="output", **kw)(BertIntermediate(c, name="intermediate", **kw)(x), x)


class BertEmbeddings(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"BLIP text: {input_ids.shape[-1]} tokens exceed max_position_embeddings="
                             f"{c.max_position_embeddings}")
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings", **kw)(
            jnp.arange(input_ids.shape[-1]))[None]
        return _layer_norm(c.layer_norm_eps, "LayerNorm", **kw)(x)


class BertEncoder(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_tokens, pad_bias):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(
                x, image_tokens, pad_bias)
        return x


class BertModel(nn.Module):
    """(input_ids [B, L], attention_mask [B, L] of 0/1, image_tokens [B, N, W]) -> last hidden [B, L, D]."""
    config: TextConfig = TextConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, image_tokens):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertEmbeddings(self.config, name="embeddings", **kw)(input_ids)
        pad_bias = ((1.0 - attention_mask.astype(jnp.float32)) * BERT_MASK_VALUE)[:, None, None, :]
        return BertEncoder(self.config, name="encoder", **kw)(x, image_tokens.astype(self.dtype),
                                                              pad_bias.astype(self.dtype))
