"""What the UNet is conditioned on, as one pytree that samplers, inversion and the losses pass through.

SD1.x/2.x: the caption embedding, an array [B, L, D] (the text encoder's last hidden state).
SDXL: a dict, as diffusers' ``StableDiffusionXLPipeline`` computes it:
  context      [B, L, D1 + D2]  both encoders' penultimate hidden states, concatenated (768 + 1280)
  text_embeds  [B, P]           the second encoder's projected pooled output (1280)
  time_ids     [B, 6]           (original h, w, crop top, crop left, target h, w)
Every leaf has the batch on axis 0, so classifier-free guidance concatenates [uncond; cond] leaf by leaf
and DRO's buffer stores rows of it.

One token row serves both SDXL tokenizers: they share the BPE vocabulary and merges and differ only in
the padding token (``<|endoftext|>`` vs ``!``), so the second encoder's ids are the first's with
everything after the first EOS replaced by its pad id (``second_encoder_ids``); ``SDXLTextEncoders``
checks that at load time (``check_tokenizers``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models.clip import CLIPTextModel

Cond = Any  # jax.Array [B, L, D] (SD) or dict (SDXL), see the module docstring
SDXL_KEYS = ("context", "text_embeds", "time_ids")


def is_sdxl(cond: Cond) -> bool:
    return isinstance(cond, dict)


def second_encoder_ids(input_ids, eos_token_id: int, pad_token_id: int):
    """input_ids [B, L] of tokenizer 1 -> tokenizer 2's ids: positions after the first EOS get ``pad_token_id``."""
    is_eos = input_ids == eos_token_id
    after_eos = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32) > 0
    return jnp.where(after_eos, pad_token_id, input_ids)


def time_ids(original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]) -> np.ndarray:
    """diffusers' ``_get_add_time_ids``: (original h, w, crop top, crop left, target h, w) float32 [6]."""
    values = (*original_size, *crop_top_left, *target_size)
    if len(values) != 6:
        raise ValueError(f"time_ids: expected 2 + 2 + 2 numbers, got original_size={original_size}, "
                         f"crop_top_left={crop_top_left}, target_size={target_size}")
    return np.asarray(values, np.float32)


def default_time_ids(resolution: int) -> np.ndarray:
    """(res, res, 0, 0, res, res): an uncropped square image at the training resolution, as Diffusion-DPO's
    SDXL script conditions every training image."""
    return time_ids((resolution, resolution), (0, 0), (resolution, resolution))


class SDXLTextEncoders(nn.Module):
    """SDXL's two CLIP text encoders as one module: input_ids [B, L] (tokenizer 1) -> {context, text_embeds}.

    Params: {"text_encoder": ..., "text_encoder_2": ...}. ``time_ids`` are added by ``with_time_ids``
    (they belong to the image, not the caption).
    """
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    eos_token_id: int
    pad_token_id_2: int
    force_zeros_for_empty_prompt: bool = True

    def __call__(self, input_ids) -> dict:
        first = self.text_encoder.encode(input_ids, output_hidden_states=True)
        ids_2 = second_encoder_ids(input_ids, self.eos_token_id, self.pad_token_id_2)
        second = self.text_encoder_2.encode(ids_2, output_hidden_states=True)
        context = jnp.concatenate([first["hidden_states"][-2], second["hidden_states"][-2]], axis=-1)
        return {"context": context, "text_embeds": second["text_embeds"]}

    @property
    def projection_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    @property
    def context_dim(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size


def check_tokenizers(tokenizer, tokenizer_2, where: str) -> None:
    """SDXL's two tokenizers must differ at most in their padding token (see the module docstring)."""
    same = (tokenizer.get_vocab() == tokenizer_2.get_vocab()
            and tokenizer.model_max_length == tokenizer_2.model_max_length
            and tokenizer.eos_token_id == tokenizer_2.eos_token_id)
    probe = ["a photo of a cat", "the"]
    if same:
        a = tokenizer(probe, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        b = tokenizer_2(probe, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        eos = tokenizer.eos_token_id
        b_from_a = np.asarray(second_encoder_ids(jnp.asarray(a), eos, tokenizer_2.pad_token_id))
        same = np.array_equal(b_from_a, np.asarray(b))
    if not same:
        raise ValueError(f"{where}: tokenizer/ and tokenizer_2/ differ in more than the padding token; "
                         "jaxpref feeds both SDXL encoders from one token row and needs them to share vocab, "
                         "merges, EOS and max length (as stabilityai/stable-diffusion-xl-base-1.0's do)")


def with_time_ids(cond: Cond, time_ids_batch: Optional[jax.Array]) -> Cond:
    """SDXL: adds time_ids [B, 6] to the encoders' dict; SD: returns the array unchanged."""
    if not is_sdxl(cond):
        return cond
    batch = cond["context"].shape[0]
    return {**cond, "time_ids": jnp.broadcast_to(jnp.asarray(time_ids_batch, jnp.float32), (batch, 6))}


def unconditional(text_encoder, text_params, null_ids, cond: Cond) -> Cond:
    """CFG's unconditional input for ``cond``'s batch: the empty prompt's encoding, or for SDXL with
    ``force_zeros_for_empty_prompt`` zeros for context and text_embeds (diffusers' encode_prompt), time_ids
    those of ``cond`` (diffusers' negative_add_time_ids default)."""
    batch = jax.tree_util.tree_leaves(cond)[0].shape[0]
    if is_sdxl(cond) and text_encoder.force_zeros_for_empty_prompt:
        return {"context": jnp.zeros_like(cond["context"]), "text_embeds": jnp.zeros_like(cond["text_embeds"]),
                "time_ids": cond["time_ids"]}
    null = jnp.broadcast_to(jnp.asarray(null_ids)[None], (batch, np.shape(null_ids)[-1]))
    emb = jax.tree_util.tree_map(lambda e: e.astype(jnp.float32), text_encoder.apply({"params": text_params}, null))
    return with_time_ids(emb, cond["time_ids"]) if is_sdxl(cond) else emb


def unet_inputs(cond: Cond) -> tuple[tuple, dict]:
    """The UNet's conditioning arguments after (x, t): (context,) for SD; SDXL's context plus
    ``added_cond_kwargs`` (text_embeds, time_ids)."""
    if is_sdxl(cond):
        return (cond["context"],), {"added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                                          "time_ids": cond["time_ids"]}}
    return (cond,), {}


def apply_unet(unet, params, x, t, cond: Cond):
    """ε(x, t, cond): the UNet call for either conditioning form. x: [B, h, w, c], t: [B]."""
    args, kwargs = unet_inputs(cond)
    return unet.apply({"params": params}, x, t, *args, **kwargs)


def cond_shapes(text_encoder, length: int, cross_attention_dim: int) -> Any:
    """Per-row shapes of the conditioning: (L, D) for SD, a dict of shapes for SDXL (DRO's buffer)."""
    if isinstance(text_encoder, SDXLTextEncoders):
        return {"context": (length, text_encoder.context_dim), "text_embeds": (text_encoder.projection_dim,),
                "time_ids": (6,)}
    return (length, cross_attention_dim)
