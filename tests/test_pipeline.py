"""SD pipeline folders: load a tiny diffusers folder, save it back, diffusers loads the same weights."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("jaxpref.models.unet", reason="jaxpref/models/unet.py (UNet engineer) not written yet")

from jaxpref.models import weights  # noqa: E402
from jaxpref.models.pipeline import (EMBEDDED_TINY, TINY_SD_DIR, SDPipeline, load_pipeline,  # noqa: E402
                                     resolve_model_path, save_pipeline)
from tiny_sd import build_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")), seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_folder):
    return load_pipeline(tiny_folder)


def _torch_key_as_ours(key: str, what: str) -> str:
    if what == "text_encoder" and not key.startswith("text_model."):
        return "text_model." + key  # transformers 5 drops the prefix that its files (and ours) keep
    return key


def _assert_state_equal(torch_module, params, what):
    ours = weights.convert_flax_to_torch(params)
    theirs = {_torch_key_as_ours(k, what): v.numpy()
              for k, v in torch_module.state_dict().items() if not k.endswith("position_ids")}
    assert set(theirs) == set(ours), (what, sorted(set(theirs) ^ set(ours))[:5])
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=f"{what}: {key}")


def test_load_tiny_folder_has_every_part(pipeline, tiny_folder):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipeline, SDPipeline) and pipeline.folder == tiny_folder
    assert pipeline.scheduler_config["_class_name"] == "DDIMScheduler"
    assert pipeline.vae.scaling_factor == pytest.approx(0.18215)
    ids = pipeline.tokenizer(["the cat"], padding="max_length", max_length=pipeline.tokenizer.model_max_length).input_ids
    assert ids[0][:4] == [0, 55, 57, 1]
    ref = StableDiffusionPipeline.from_pretrained(tiny_folder)
    _assert_state_equal(ref.unet, pipeline.unet_params, "unet")
    _assert_state_equal(ref.vae, pipeline.vae_params, "vae")
    _assert_state_equal(ref.text_encoder, pipeline.text_encoder_params, "text_encoder")


def test_save_pipeline_loads_in_diffusers(pipeline, tmp_path):
    import jax
    from diffusers import StableDiffusionPipeline

    new_unet = jax.tree_util.tree_map(lambda p: p + 1.0, pipeline.unet_params)
    save_pipeline(str(tmp_path), pipeline, unet_params=new_unet)
    index = json.load(open(tmp_path / "model_index.json"))
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.safety_checker is None
    _assert_state_equal(loaded.unet, new_unet, "unet")
    _assert_state_equal(loaded.vae, pipeline.vae_params, "vae")
    _assert_state_equal(loaded.text_encoder, pipeline.text_encoder_params, "text_encoder")
    assert loaded.tokenizer("the cat").input_ids == pipeline.tokenizer("the cat").input_ids
    again = load_pipeline(str(tmp_path))
    assert again.vae == pipeline.vae and again.text_encoder == pipeline.text_encoder


def test_missing_parts_are_named(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"broken/vae: missing"):
        load_pipeline(str(broken))
    index = json.load(open(broken / "model_index.json"))
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="text_encoder_2"):
        load_pipeline(str(broken))
    index["unet"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"\['unet'\] are missing or null"):
        load_pipeline(str(broken))


def test_tokenizer_as_vocab_and_merges(tiny_folder, tmp_path):
    """SD1.5-era folders ship vocab.json + merges.txt rather than tokenizer.json."""
    from tiny_sd import tiny_tokenizer

    folder = tmp_path / "sd"
    shutil.copytree(tiny_folder, folder)
    shutil.rmtree(folder / "tokenizer")
    tiny_tokenizer(str(folder / "tokenizer"))
    assert sorted(os.listdir(folder / "tokenizer")) == ["merges.txt", "vocab.json"]
    assert load_pipeline(str(folder)).tokenizer("the cat").input_ids == [0, 55, 57, 1]


def test_embedded_tiny_resolves_to_the_shipped_folder(tmp_path):
    assert resolve_model_path(EMBEDDED_TINY) == TINY_SD_DIR
    assert os.path.isfile(os.path.join(TINY_SD_DIR, "model_index.json"))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # any other path is left as it is
