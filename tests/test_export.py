"""Export: the written folder loads in PyTorch diffusers and generates what jaxpref generates."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from jaxpref import export as export_lib
from jaxpref.evaluate import decode_latents, generate, initial_noise, latent_shape
from jaxpref.models import load_pipeline
from jaxpref.models.presets import TEST_TINY_UNET
from jaxpref.models.unet import load_unet, save_unet
from tiny_sd import build_tiny_sd, randomize_

PROMPTS = ["the cat", "a cat", "the"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturbed(params, seed=1, scale=0.02):
    """A stand-in for trained params: every leaf moved by seeded noise."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_sd(str(root / "base"), seed=0)
    pipe = load_pipeline(base)
    trained = _perturbed(pipe.unet_params)
    save_unet(str(root / "unet_ckpt"), pipe.unet, trained)
    return root, base, pipe, trained


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_generates_like_diffusers(world):
    """Same x_T, DDIM 4 steps, CFG 7.5: diffusers on the export vs jaxpref. Measured: latents max |diff|
    3.8e-5 on values up to 17 (2e-6 relative; 7e-5 at 10 steps), decoded images 5e-6 on [0, 1], uint8
    images at most 1 level apart (rounding at .5 boundaries)."""
    from diffusers import StableDiffusionPipeline

    root, base, pipe, trained = world
    out = export_lib.export(str(root / "unet_ckpt"), str(root / "exported"), base)
    sd = StableDiffusionPipeline.from_pretrained(out)
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    gen = generate(out, PROMPTS, sampler="ddim", num_steps=4, guidance_scale=7.5, seed=3, batch_size=4)
    x_T = np.asarray(initial_noise(gen.seeds[:, 0], latent_shape(pipe, None, None)))
    kw = dict(prompt=PROMPTS, latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
              guidance_scale=7.5)
    with torch.no_grad():
        ref_latents = sd(output_type="latent", **kw).images.numpy().transpose(0, 2, 3, 1)
        ref_images = sd(output_type="np", **kw).images
    np.testing.assert_allclose(gen.latents[:, 0], ref_latents, atol=1e-4)
    ours = decode_latents(load_pipeline(out), gen.latents[:, 0])
    np.testing.assert_allclose(ours, ref_images, atol=1e-4)
    assert np.abs(gen.images[:, 0].astype(int) - np.round(ref_images * 255).astype(int)).max() <= 1


def test_export_round_trips_and_keeps_the_base_parts(world):
    root, base, pipe, trained = world
    out = str(root / "exported_again")
    export_lib.export(str(root / "unet_ckpt"), out, base)
    again, params = export_lib.load_trained(out, None)  # a pipeline folder is its own base
    _assert_tree_equal(params, trained)
    _assert_tree_equal(again.vae_params, pipe.vae_params)
    _assert_tree_equal(again.text_encoder_params, pipe.text_encoder_params)
    assert again.scheduler_config["_class_name"] == pipe.scheduler_config["_class_name"]
    with pytest.raises(ValueError, match="not empty"):
        export_lib.export(str(root / "unet_ckpt"), out, base)


def test_workdir_uses_load_policy_params(world, monkeypatch):
    import jaxpref.checkpoint as checkpoint_lib

    root, base, pipe, trained = world
    workdir = root / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    calls = []

    def fake(path, unet_shapes, use_ema=True):
        calls.append((path, use_ema))
        assert jax.tree_util.tree_structure(unet_shapes) == jax.tree_util.tree_structure(trained)
        return trained

    monkeypatch.setattr(checkpoint_lib, "load_policy_params", fake, raising=False)
    out = export_lib.export(str(workdir), str(root / "from_workdir"), base)
    assert calls == [(str(workdir), True)]
    _, params = load_unet(os.path.join(out, "unet"))
    _assert_tree_equal(params, trained)
    # Without --base, the model the run trained from (its config.json), as jaxpref.evaluate reads it.
    with pytest.raises(ValueError, match="pass the base model folder"):
        export_lib.export(str(workdir), str(root / "no_base"))
    (workdir / "config.json").write_text(json.dumps({"model_path": str(base), "objective": "dpo"}))
    out = export_lib.export(str(workdir), str(root / "from_workdir_config"))
    _assert_tree_equal(load_unet(os.path.join(out, "unet"))[1], trained)
    monkeypatch.delattr(checkpoint_lib, "load_policy_params", raising=False)
    with pytest.raises(ValueError, match="load_policy_params"):
        export_lib.load_trained(str(workdir), base)


def test_bad_checkpoints_fail_at_start(world):
    from diffusers import UNet2DConditionModel

    root, base, pipe, trained = world
    other = str(root / "other_arch")
    torch.manual_seed(0)
    randomize_(UNet2DConditionModel(**{**TEST_TINY_UNET, "block_out_channels": (8, 24)})).save_pretrained(other)
    with pytest.raises(ValueError, match="another architecture") as e:
        export_lib.load_trained(other, base)
    assert "other_arch" in str(e.value)
    with pytest.raises(ValueError, match="pass the base model"):
        export_lib.load_trained(str(root / "unet_ckpt"), None)
    with pytest.raises(ValueError, match="no such checkpoint"):
        export_lib.load_trained(str(root / "missing"), base)
    (root / "junk").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        export_lib.load_trained(str(root / "junk"), base)


def test_cli(world):
    root, base, _, trained = world
    out = str(root / "cli_export")
    cmd = [sys.executable, "-m", "jaxpref.export", f"--checkpoint={root / 'unet_ckpt'}", f"--out={out}",
           f"--base={base}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    _, params = load_unet(os.path.join(out, "unet"))
    _assert_tree_equal(params, trained)
