"""The shipped tiny base model (jaxpref/assets/tiny_sd): it loads as any SD1.5 folder does, its files are the
ones MANIFEST.json names, the script that made it is deterministic, and the model is mediocre on purpose."""
import json
import os

import numpy as np
import pytest

from jaxpref.world import shapes
from jaxpref.models import load_pipeline, presets
from jaxpref.world import train_base

SHIPPED = train_base.DEFAULT_OUT


@pytest.fixture(scope="module")
def manifest():
    path = os.path.join(SHIPPED, train_base.MANIFEST)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: the shipped tiny model is not there; regenerate it with "
                    "`python -m jaxpref.world.train_base`")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shipped(manifest):
    return load_pipeline(SHIPPED)


def test_shipped_files_match_manifest(manifest):
    assert manifest["files"], "MANIFEST.json lists no files"
    assert train_base.folder_hashes(SHIPPED) == manifest["files"]
    assert manifest["args"]["evaluate"]  # measured; the shipped run used the default --steps-scale 1
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert name in manifest["files"], name
    # The tokenizer is the shapes tokenizer, byte for byte.
    from jaxpref.data.tokenizer import SHAPES_TOKENIZER_DIR
    for name in os.listdir(SHAPES_TOKENIZER_DIR):
        assert manifest["files"][f"tokenizer/{name}"] == train_base.sha256_of(os.path.join(SHAPES_TOKENIZER_DIR, name))


def test_shipped_loads_like_sd15(shipped, manifest):
    """Same loader as SD1.5; the configs are the presets (jaxpref.models.presets); the measured scaling factor."""
    assert shipped.unet.block_out_channels == tuple(presets.TINY_SD_UNET["block_out_channels"])
    assert shipped.unet.cross_attention_dim == shipped.text_encoder.config.hidden_size
    assert shipped.vae.block_out_channels == tuple(presets.TINY_SD_VAE["block_out_channels"])
    assert shipped.vae.scaling_factor == manifest["vae_scaling_factor"]
    assert shipped.text_encoder.config.vocab_size == len(shipped.tokenizer)
    assert shipped.text_encoder.config.eos_token_id == shipped.tokenizer.eos_token_id
    assert shipped.tokenizer.model_max_length == shipped.text_encoder.config.max_position_embeddings
    sched = {k: v for k, v in shipped.scheduler_config.items() if not k.startswith("_")}
    assert sched == {k: v for k, v in presets.SD15_SCHEDULER.items() if not k.startswith("_")}
    m = manifest["metrics"]
    assert m["noise_image_reward_mean"] < m["base_reward_mean"] < m["clean_render_reward_mean"]


@pytest.mark.slow
@pytest.mark.compiled_for_few_runs
def test_regeneration_is_byte_identical(tmp_path_factory):
    """A tiny --steps-scale run, twice: every model file hashes the same (MANIFEST.json differs in its times).
    3 VAE steps (2 on crops, then 1 on whole images: both compiled programs) and 3 UNet steps on 128 images; the
    second run reuses the first's compiles, so what is checked is that the script computes the same bytes from
    the same programs: they compile at LLVM level 0 (the marker: built faster, and each runs a few steps)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    hashes = []
    for k in range(2):
        out = str(tmp_path_factory.mktemp(f"regen{k}") / "tiny_sd")
        manifest = train_base.run(out, steps_scale=0.001, seed=0, data_dir=data_dir, evaluate=False,
                                  max_images=128, log=lambda *a: None)
        assert manifest["files"] == train_base.folder_hashes(out)
        assert manifest["steps"] == {"vae": 3, "unet": 3}
        hashes.append(manifest["files"])
    assert hashes[0] == hashes[1]


def test_shipped_model_is_mediocre_on_purpose(shipped):
    """Held-out generations beat random noise images and stay clearly below clean renders."""
    prompts = shapes.heldout_prompts()[::8][:4]
    k = 4
    images = train_base.generate(shipped, prompts, k, num_steps=10, guidance=3.0, seed=0)
    captions = [p for p in prompts for _ in range(k)]
    base = float(shapes.reward_batch(images, captions).mean())
    clean, _ = train_base.clean_renders(prompts, k)
    clean_reward = float(shapes.reward_batch(clean, captions).mean())
    noise = np.random.default_rng(0).integers(0, 256, clean.shape, dtype=np.uint8)
    noise_reward = float(shapes.reward_batch(noise, captions).mean())
    # Measured on the shipped model: noise 0.068, base 0.568, clean 0.978 (10 DDIM steps, 16 images).
    assert noise_reward + 0.3 < base < clean_reward - 0.2, (noise_reward, base, clean_reward)
