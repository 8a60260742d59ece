"""AutoencoderKL: parity with diffusers on random weights, folder round trip, legacy names, bad input."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpref.models import weights
from jaxpref.models.vae import AutoencoderKL, load_vae, posterior, save_vae, vae_from_config
from tiny_sd import tiny_vae

RTOL = 1e-4


def rel_err(ours, ref):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _fns(module):
    return (jax.jit(functools.partial(module.apply, method=AutoencoderKL.encode)),
            jax.jit(functools.partial(module.apply, method=AutoencoderKL.decode)))


def encode(module, params, images):
    return _fns(module)[0]({"params": params}, images)


def decode(module, params, latents):
    return _fns(module)[1]({"params": params}, latents)


IMAGES = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
LATENTS = np.random.RandomState(1).randn(2, 4, 4, 4).astype(np.float32)


@pytest.fixture(scope="module")
def torch_vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="module")
def vae_folder(torch_vae, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    torch_vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(vae_folder):
    return load_vae(vae_folder)


def test_encode_matches_diffusers(torch_vae, ours):
    module, params = ours
    mean, logvar = encode(module, params, IMAGES)
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(IMAGES)).latent_dist
    assert mean.shape == (2, 4, 4, 4) and mean.dtype == jnp.float32
    assert rel_err(mean, nhwc(posterior.mean)) <= RTOL
    assert rel_err(logvar, nhwc(posterior.logvar)) <= RTOL
    assert module.scaling_factor == pytest.approx(0.18215)


def test_posterior_of_pixels_matches_diffusers(torch_vae, ours):
    """posterior: uint8 pixels map to [-1, 1] (x / 127.5 - 1), std is the latent_dist's; floats pass through."""
    module, params = ours
    pixels = np.random.RandomState(2).randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    unit = pixels.astype(np.float32) / 127.5 - 1.0
    fn = jax.jit(lambda p, images: posterior(module, p, images))
    mean, std = fn(params, pixels)
    with torch.no_grad():
        dist = torch_vae.encode(nchw(unit)).latent_dist
    assert rel_err(mean, nhwc(dist.mean)) <= RTOL and rel_err(std, nhwc(dist.std)) <= RTOL
    mean_f, std_f = fn(params, unit)
    assert rel_err(mean_f, np.asarray(mean)) <= 1e-6 and rel_err(std_f, np.asarray(std)) <= 1e-6


def test_decode_matches_diffusers(torch_vae, ours):
    module, params = ours
    images = decode(module, params, LATENTS)
    with torch.no_grad():
        ref = nhwc(torch_vae.decode(nchw(LATENTS)).sample)
    assert images.shape == (2, 16, 16, 3)
    assert rel_err(images, ref) <= RTOL


def test_variant_without_quant_convs_or_mid_attention(tmp_path):
    torch_vae = tiny_vae(seed=3, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                         block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.13)
    torch_vae.save_pretrained(tmp_path)
    module, params = load_vae(str(tmp_path))
    assert "quant_conv" not in params and module.scaling_factor == pytest.approx(0.13)
    mean, _ = encode(module, params, IMAGES)
    images = decode(module, params, LATENTS[:, :8, :8])
    with torch.no_grad():
        ref_mean = nhwc(torch_vae.encode(nchw(IMAGES)).latent_dist.mean)
        ref_images = nhwc(torch_vae.decode(nchw(LATENTS[:, :8, :8])).sample)
    assert rel_err(mean, ref_mean) <= RTOL and rel_err(images, ref_images) <= RTOL


def test_bf16_compute_stays_close(vae_folder, ours):
    module, params = ours
    module16, params16 = load_vae(vae_folder, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.float32
    images16 = decode(module16, params16, LATENTS)
    assert images16.dtype == jnp.float32
    assert rel_err(images16, np.asarray(decode(module, params, LATENTS))) < 5e-2


def test_save_roundtrip_loads_in_diffusers(torch_vae, ours, tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    module, params = ours
    save_vae(str(tmp_path), module, params)
    reloaded = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
    ref_state = torch_vae.state_dict()
    assert set(reloaded.state_dict()) == set(ref_state)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded.decode(nchw(LATENTS)).sample, torch_vae.decode(nchw(LATENTS)).sample)
    module2, params2 = load_vae(str(tmp_path))
    assert module2 == module
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_legacy_attention_names_load(vae_folder, ours, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in weights.read_safetensors(os.path.join(vae_folder, "diffusion_pytorch_model.safetensors")).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        tensors[key] = np.array(value)
    assert any(".proj_attn." in k for k in tensors)
    weights.write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    (tmp_path / "config.json").write_text(open(os.path.join(vae_folder, "config.json")).read())
    _, params = load_vae(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ours[1])


def test_missing_weights_file_names_it(tmp_path, vae_folder):
    (tmp_path / "config.json").write_text(open(os.path.join(vae_folder, "config.json")).read())
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        load_vae(str(tmp_path / "nowhere"))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="unknown key 'spatial_norm'"):
        vae_from_config({"spatial_norm": True})
    with pytest.raises(ValueError, match=r"act_fn='gelu'.*silu"):
        vae_from_config({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types.*DownEncoderBlock2D"):
        vae_from_config({"block_out_channels": [32], "down_block_types": ["AttnDownEncoderBlock2D"]})
    module = vae_from_config({"_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0",
                              "block_out_channels": [32, 64], "sample_size": 512})
    assert module.block_out_channels == (32, 64) and module.sample_size == 512


def test_wrong_tensor_shape_names_file_tensor_and_shapes(vae_folder, tmp_path):
    config = json.load(open(os.path.join(vae_folder, "config.json")))
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(vae_folder, "diffusion_pytorch_model.safetensors"),
               tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors[\s\S]*"
                                         r"tensor quant_conv\.weight: checkpoint shape \(8, 8, 1, 1\)"):
        load_vae(str(tmp_path))
