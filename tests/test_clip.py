"""CLIP text encoder (+ projection) and full CLIPModel: parity with transformers, round trip, bad input."""
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxpref.models import weights
from jaxpref.models.clip import (CLIPModel, CLIPTextModel, clip_from_config, load_clip, load_text_encoder,
                                 save_clip, save_text_encoder, text_encoder_from_config)
from tiny_sd import MAX_LENGTH, randomize_, tiny_text_config, tiny_text_encoder

RTOL = 1e-4
VOCAB = 60


def rel_err(ours, ref):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def token_ids(eos: int, batch: int = 3) -> np.ndarray:
    """Random ids with an EOS mid-sequence, repeated as padding in one row (the case the rule must handle)."""
    ids = np.random.RandomState(0).randint(2, VOCAB - 1, (batch, MAX_LENGTH))
    ids[:, 0] = 0
    ids[np.arange(batch), [4, 7, MAX_LENGTH - 1][:batch]] = eos
    ids[0, 5:] = eos
    return ids


@functools.lru_cache(maxsize=None)
def _jitted(module, method, **kw):
    return jax.jit(functools.partial(module.apply, method=method, **kw))


def run_text(module, params, ids, output_hidden_states=True):
    return _jitted(module, CLIPTextModel.encode, output_hidden_states=output_hidden_states)({"params": params}, ids)


# eos_token_id=2: the pre-#24773 rule (pool at the highest id, SD1.5's config); 1: first EOS occurrence.
@pytest.mark.parametrize("eos,act", [(2, "quick_gelu"), (1, "gelu")])
def test_text_encoder_matches_transformers(eos, act, tmp_path):
    ref = tiny_text_encoder(seed=eos, vocab_size=VOCAB, eos_token_id=eos, hidden_act=act, num_hidden_layers=3)
    ref.save_pretrained(tmp_path)
    module, params = load_text_encoder(str(tmp_path))
    assert not module.with_projection and module.config.hidden_act == act
    ids = token_ids(eos if eos != 2 else VOCAB - 1)
    out = run_text(module, params, ids)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    assert rel_err(out["last_hidden_state"], expected.last_hidden_state.numpy()) <= RTOL
    assert rel_err(out["pooler_output"], expected.pooler_output.numpy()) <= RTOL
    assert len(out["hidden_states"]) == len(expected.hidden_states) == 4
    assert rel_err(out["hidden_states"][-2], expected.hidden_states[-2].numpy()) <= RTOL
    last = _jitted(module, CLIPTextModel.__call__)({"params": params}, ids)   # another program: fp32 rounding apart
    assert rel_err(last, np.asarray(out["last_hidden_state"], np.float64)) <= 1e-6


def test_text_encoder_with_projection_matches_transformers(tmp_path):
    ref = tiny_text_encoder(seed=5, with_projection=True, vocab_size=VOCAB, hidden_act="gelu")
    ref.save_pretrained(tmp_path)
    module, params = load_text_encoder(str(tmp_path))
    assert module.with_projection and params["text_projection"]["kernel"].shape == (16, 8)
    ids = token_ids(1)
    out = run_text(module, params, ids)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    assert rel_err(out["text_embeds"], expected.text_embeds.numpy()) <= RTOL
    assert rel_err(out["hidden_states"][-2], expected.hidden_states[-2].numpy()) <= RTOL


def test_text_encoder_roundtrip_and_legacy_keys(tmp_path):
    ref = tiny_text_encoder(seed=7, vocab_size=VOCAB)
    ref.save_pretrained(tmp_path / "hf")
    module, params = load_text_encoder(str(tmp_path / "hf"))
    save_text_encoder(str(tmp_path / "ours"), module, params)
    reloaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "ours")).eval()
    for key, value in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    ids = torch.from_numpy(token_ids(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).pooler_output, ref(ids).pooler_output)
    # Our files use the transformers-4 names (text_model.*) that SD1.5 checkpoints also carry.
    saved = weights.read_safetensors(str(tmp_path / "ours" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in saved)
    # ... and the position_ids buffer old checkpoints carry is accepted.
    legacy = {**saved, "text_model.embeddings.position_ids": np.arange(MAX_LENGTH, dtype=np.int64)[None]}
    weights.write_safetensors(str(tmp_path / "ours" / "model.safetensors"), legacy)
    _, params2 = load_text_encoder(str(tmp_path / "ours"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_projection_and_sharded_roundtrip(tmp_path):
    ref = tiny_text_encoder(seed=8, with_projection=True, vocab_size=VOCAB)
    ref.save_pretrained(tmp_path / "hf")
    module, params = load_text_encoder(str(tmp_path / "hf"))
    save_text_encoder(str(tmp_path / "ours"), module, params)
    reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "ours")).eval()
    ids = torch.from_numpy(token_ids(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).text_embeds, ref(ids).text_embeds)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    _, sharded_params = load_text_encoder(str(tmp_path / "sharded"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded_params, params)


@pytest.fixture(scope="module")
def torch_clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=tiny_text_config(vocab_size=VOCAB).to_dict(),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                           image_size=16, patch_size=4),
        projection_dim=8)
    return randomize_(transformers.CLIPModel(config), seed=0)


def _features(output):
    """transformers 5 returns an output object whose pooler_output is the projected embedding."""
    return getattr(output, "pooler_output", output).numpy()


def test_clip_model_matches_transformers(torch_clip, tmp_path):
    torch_clip.save_pretrained(tmp_path)
    module, params = load_clip(str(tmp_path))
    pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    ids = token_ids(1)
    image = _jitted(module, CLIPModel.get_image_features)({"params": params}, pixels)
    text = _jitted(module, CLIPModel.get_text_features)({"params": params}, ids)
    logits = _jitted(module, CLIPModel.__call__)({"params": params}, ids, pixels)
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref_image = _features(torch_clip.get_image_features(torch_pixels))
        ref_text = _features(torch_clip.get_text_features(torch.from_numpy(ids)))
        ref_logits = torch_clip(input_ids=torch.from_numpy(ids), pixel_values=torch_pixels).logits_per_image
    assert image.shape == (2, 8) and text.shape == (3, 8)
    assert rel_err(image, ref_image) <= RTOL
    assert rel_err(text, ref_text) <= RTOL
    assert rel_err(logits, ref_logits.numpy()) <= RTOL


def test_clip_model_roundtrip(torch_clip, tmp_path):
    torch_clip.save_pretrained(tmp_path / "hf")
    module, params = load_clip(str(tmp_path / "hf"))
    save_clip(str(tmp_path / "ours"), module, params)
    reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).eval()
    ref_state = torch_clip.state_dict()
    assert set(reloaded.state_dict()) == set(ref_state)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Bit-equal weights; torch may still pick a different CPU kernel for a freshly loaded model (1 ulp
        # differences seen), so the outputs are compared to float32 rounding, not bit for bit.
        np.testing.assert_allclose(_features(reloaded.get_image_features(pixels)),
                                   _features(torch_clip.get_image_features(pixels)), rtol=1e-6, atol=1e-7)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match=r"hidden_act='relu'.*quick_gelu"):
        text_encoder_from_config({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="unknown key 'rotary_dim'"):
        text_encoder_from_config({"rotary_dim": 4})
    with pytest.raises(ValueError, match="model_type='t5'"):
        text_encoder_from_config({"model_type": "t5"})
    with pytest.raises(ValueError, match="unknown key 'image_size'"):
        clip_from_config({"text_config": {}, "vision_config": {}, "image_size": 4})
    # Real configs carry HF bookkeeping and generation defaults; those are fine.
    module = text_encoder_from_config({"architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16",
                                       "dropout": 0.0, "num_beams": 1, "_name_or_path": "x"})
    assert module.with_projection


def test_missing_file_and_wrong_shape_are_named(tmp_path):
    ref = tiny_text_encoder(seed=9, vocab_size=VOCAB)
    ref.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors[\s\S]*tensor text_model\.encoder\.layers\.0\.mlp\.fc1"
                                         r"\.weight: checkpoint shape \(32, 16\) \(as Flax \(16, 32\)\)"
                                         r" does not match the model's \(16, 40\)"):
        load_text_encoder(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_text_encoder(str(tmp_path))
