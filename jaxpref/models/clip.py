"""HF transformers CLIP (text encoder, text encoder with projection, full CLIPModel) in Flax.

The text encoder conditions the UNet (SD: last hidden state; SDXL: penultimate hidden state of two
encoders plus the second one's projected pooled output); the full CLIPModel scores images for
preference metrics. Submodules carry HF's own names (``text_model.encoder.layers_3.self_attn.q_proj``,
``vision_model.pre_layrnorm``, sic), so loading is the generic rule in ``weights.py``.
Images are channels-last: ``pixel_values`` [B, H, W, 3], already CLIP-normalized.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import weights

Dtype = Any

WEIGHTS_STEM = "model"
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# ---------------------------------------------------------------------------------------------
# Configs: the fields that change the computation, with transformers' defaults.

@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


# ---------------------------------------------------------------------------------------------
# Modules, bottom up.

def _layer_norm(epsilon: float, name: str, dtype: Dtype, param_dtype: Dtype):
    """torch's two-pass variance: CLIP's residual stream has a few huge channels, where the one-pass
    E[x^2] - E[x]^2 loses digits."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention, optionally causal; x: [B, L, D] -> [B, L, D]."""
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, length, d = x.shape
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(b, length, self.num_heads, d // self.num_heads)
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return dense("out_proj")(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, name="fc1", **kw)(x))
        return nn.Dense(x.shape[-1], name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block."""
    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    causal: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm(self.eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.num_heads, self.causal, name="self_attn", **kw)(h)
        h = _layer_norm(self.eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """Stack of layers; returns all hidden states (input first), as HF's ``hidden_states``."""
    config: Any  # TextConfig | VisionConfig
    causal: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> list:
        c = self.config
        states = [x]
        for i in range(c.num_hidden_layers):
            x = CLIPEncoderLayer(c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                                 self.causal, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
            states.append(x)
        return states


class CLIPTextEmbeddings(nn.Module):
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"CLIP text: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={c.max_position_embeddings}")
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """HF's ``text_model``: input_ids [B, L] -> (last_hidden_state [B, L, D], pooled [B, D], hidden states)."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        states = CLIPEncoder(c, causal=True, name="encoder", **kw)(x)
        last = _layer_norm(c.layer_norm_eps, name="final_layer_norm", **kw)(states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        return last, pooled, states


def eos_positions(input_ids, eos_token_id: Optional[int]):
    """Index of the token whose state is the pooled output: input_ids [B, L] -> [B].

    transformers' rule: configs written before its PR #24773 carry eos_token_id=2 and pool at the
    highest token id (the EOS token is the largest id in the original vocab); newer ones pool at the
    first occurrence of eos_token_id (padding may repeat it).
    """
    if eos_token_id == 2 or eos_token_id is None:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPVisionEmbeddings(nn.Module):
    """pixel_values [B, H, W, C] -> [B, 1 + (H/p)*(W/p), D] (class token first)."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        if pixel_values.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision: image size {pixel_values.shape[1:3]} does not match the model's "
                             f"image_size={c.image_size}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,),
                                     self.param_dtype)
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", use_bias=False, name="patch_embedding", **kw)(pixel_values)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(x.shape[1], c.hidden_size, name="position_embedding", **kw)(jnp.arange(x.shape[1]))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    """HF's ``vision_model``: pixel_values [B, H, W, C] -> (last_hidden_state [B, N, D], pooled [B, D])."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixel_values.astype(self.dtype))
        x = _layer_norm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        last = CLIPEncoder(c, causal=False, name="encoder", **kw)(x)[-1]
        pooled = _layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)(last[:, 0])
        return last, pooled


class CLIPTextModel(nn.Module):
    """HF CLIPTextModel, or CLIPTextModelWithProjection when ``with_projection`` (SDXL's second encoder)."""
    config: TextConfig = TextConfig()
    with_projection: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype, self.param_dtype)
        if self.with_projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype)

    def encode(self, input_ids, output_hidden_states: bool = False) -> dict:
        """input_ids [B, L] int -> dict, all fp32:

        last_hidden_state [B, L, D] (after final_layer_norm); pooler_output [B, D] (the EOS state);
        text_embeds [B, P] (projected pooled output, only ``with_projection``); hidden_states (only
        ``output_hidden_states``): tuple of num_hidden_layers + 1 arrays [B, L, D], embeddings first,
        none layer-normed (SDXL conditions on ``hidden_states[-2]``).
        """
        last, pooled, states = self.text_model(input_ids)
        out = {"last_hidden_state": last.astype(jnp.float32), "pooler_output": pooled.astype(jnp.float32)}
        if self.with_projection:
            out["text_embeds"] = self.text_projection(pooled).astype(jnp.float32)
        if output_hidden_states:
            out["hidden_states"] = tuple(s.astype(jnp.float32) for s in states)
        return out

    def __call__(self, input_ids):
        """input_ids [B, L] -> last_hidden_state [B, L, D] fp32 (what SD1.x/2.x condition on)."""
        return self.encode(input_ids)["last_hidden_state"]


class CLIPModel(nn.Module):
    """HF CLIPModel: both towers, their projections and logit_scale."""
    text_config: TextConfig = TextConfig()
    vision_config: VisionConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(self.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(self.vision_config, **kw)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init_value), (),
                                      self.param_dtype)

    def get_image_features(self, pixel_values):
        """pixel_values [B, H, W, 3] (normalized) -> image embeddings [B, P] fp32, not unit-normalized."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled).astype(jnp.float32)

    def get_text_features(self, input_ids):
        """input_ids [B, L] -> text embeddings [B, P] fp32, not unit-normalized."""
        _, pooled, _ = self.text_model(input_ids)
        return self.text_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids, pixel_values):
        """-> logits_per_image [B_img, B_txt]: scaled cosine similarities, as HF's CLIPModel."""
        image = self.get_image_features(pixel_values)
        text = self.get_text_features(input_ids)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T


# ---------------------------------------------------------------------------------------------
# HF config.json <-> our configs.

# Keys any HF PretrainedConfig may carry (bookkeeping, generation and training defaults): they do not
# change an encoder's forward pass.
_HF_GENERIC_KEYS = frozenset("""
    _name_or_path _commit_hash _attn_implementation_autoset architectures model_type transformers_version
    dtype torch_dtype use_bfloat16 return_dict output_hidden_states output_attentions torchscript
    tie_word_embeddings is_decoder is_encoder_decoder add_cross_attention cross_attention_hidden_size
    tie_encoder_decoder chunk_size_feed_forward pruned_heads id2label label2id problem_type finetuning_task
    tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens tf_legacy_loss gradient_checkpointing
    dropout attention_dropout initializer_range initializer_factor
""".split())
_SUPPORTED_VALUES = {"hidden_act": tuple(_ACTIVATIONS)}


def _parse(cls, config: dict, what: str, extra_ignored=frozenset()):
    """Our config dataclass from an HF config dict; unknown keys or unsupported values -> ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {}
    for key, value in config.items():
        if key in names:
            supported = _SUPPORTED_VALUES.get(key)
            if supported is not None and value not in supported:
                raise ValueError(f"{what}: {key}={value!r} is not supported (supported: {list(supported)})")
            fields[key] = value
        elif key not in _HF_GENERIC_KEYS and key not in extra_ignored:
            raise ValueError(f"{what}: unknown key {key!r} (value {value!r}); known keys: {sorted(names)}")
    parsed = cls(**fields)
    if parsed.hidden_size % parsed.num_attention_heads:
        raise ValueError(f"{what}: hidden_size={parsed.hidden_size} is not divisible by "
                         f"num_attention_heads={parsed.num_attention_heads}")
    return parsed


def text_config_from_dict(config: dict) -> TextConfig:
    return _parse(TextConfig, config, "CLIP text config")


def vision_config_from_dict(config: dict) -> VisionConfig:
    return _parse(VisionConfig, config, "CLIP vision config")


def text_encoder_from_config(config: dict, dtype: Dtype = jnp.float32, with_projection: Optional[bool] = None):
    """Our CLIPTextModel from an HF text config; projection from ``architectures`` unless given."""
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"CLIP text config: model_type={config['model_type']!r} is not supported "
                         "(supported: ['clip_text_model'])")
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in config.get("architectures", ())
    return CLIPTextModel(text_config_from_dict(config), with_projection, dtype=dtype)


def clip_from_config(config: dict, dtype: Dtype = jnp.float32) -> CLIPModel:
    """Our CLIPModel from an HF CLIPConfig dict (old ``text_config_dict`` overrides honoured, as HF does)."""
    if config.get("model_type", "clip") != "clip":
        raise ValueError(f"CLIP config: model_type={config['model_type']!r} is not supported (supported: ['clip'])")
    known = {"text_config", "vision_config", "text_config_dict", "vision_config_dict", "projection_dim",
             "logit_scale_init_value"}
    for key, value in config.items():
        if key not in known and key not in _HF_GENERIC_KEYS:
            raise ValueError(f"CLIP config: unknown key {key!r} (value {value!r}); known keys: {sorted(known)}")
    text = {**config.get("text_config", {}), **(config.get("text_config_dict") or {})}
    vision = {**config.get("vision_config", {}), **(config.get("vision_config_dict") or {})}
    text.pop("model_type", None), vision.pop("model_type", None)
    return CLIPModel(text_config_from_dict(text), vision_config_from_dict(vision),
                     config.get("projection_dim", 512), config.get("logit_scale_init_value", 2.6592), dtype=dtype)


def _text_config_dict(c: TextConfig) -> dict:
    return {**dataclasses.asdict(c), "model_type": "clip_text_model"}


def _vision_config_dict(c: VisionConfig) -> dict:
    return {**dataclasses.asdict(c), "model_type": "clip_vision_model"}


# ---------------------------------------------------------------------------------------------
# Loading / saving HF folders.

_IGNORED_BUFFERS = [r"position_ids$"]  # non-persistent buffers some older checkpoints still contain


def _prefix_text_model(key: str) -> str:
    """transformers >= 5 saves a bare CLIPTextModel without the ``text_model.`` prefix; add it back."""
    if key.startswith("text_model.") or key == "text_projection.weight":
        return key
    return "text_model." + key


def _load(folder: str, module: nn.Module, init_args, rename=None):
    tensors, source = weights.read_checkpoint_folder(folder, WEIGHTS_STEM)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *init_args)["params"]
    params = weights.convert_torch_to_flax(tensors, shapes, source, dtype=np.float32, rename=rename,
                                           ignore=_IGNORED_BUFFERS)
    return jax.tree_util.tree_map(jnp.asarray, params)


def _save(folder: str, config: dict, params) -> None:
    params = params.get("params", params)  # accept init()'s {"params": ...} too
    weights.write_config(folder, config)
    weights.write_safetensors(os.path.join(folder, f"{WEIGHTS_STEM}.safetensors"),
                              weights.convert_flax_to_torch(params, dtype=np.float32))


def load_text_encoder(folder: str, dtype: Dtype = jnp.float32) -> tuple[CLIPTextModel, Any]:
    """Reads an HF CLIPTextModel[WithProjection] folder (config.json + model.safetensors or sharded).

    ``dtype`` is the compute dtype; params stay fp32. Returns (module, params).
    """
    module = text_encoder_from_config(weights.read_config(folder), dtype)
    ids = jax.ShapeDtypeStruct((1, module.config.max_position_embeddings), jnp.int32)
    return module, _load(folder, module, (ids,), rename=_prefix_text_model)


def save_text_encoder(folder: str, module: CLIPTextModel, params) -> None:
    """Writes a folder ``transformers.CLIPTextModel[WithProjection].from_pretrained`` loads."""
    arch = "CLIPTextModelWithProjection" if module.with_projection else "CLIPTextModel"
    _save(folder, {**_text_config_dict(module.config), "architectures": [arch]}, params)


def load_clip(folder: str, dtype: Dtype = jnp.float32) -> tuple[CLIPModel, Any]:
    """Reads an HF CLIPModel folder; returns (module, params), params fp32."""
    module = clip_from_config(weights.read_config(folder), dtype)
    t, v = module.text_config, module.vision_config
    ids = jax.ShapeDtypeStruct((1, t.max_position_embeddings), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return module, _load(folder, module, (ids, pixels))


def save_clip(folder: str, module: CLIPModel, params) -> None:
    """Writes a folder ``transformers.CLIPModel.from_pretrained`` loads."""
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": module.projection_dim,
              "logit_scale_init_value": module.logit_scale_init_value,
              "text_config": _text_config_dict(module.text_config),
              "vision_config": _vision_config_dict(module.vision_config)}
    _save(folder, config, params)
