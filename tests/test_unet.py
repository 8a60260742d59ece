"""Our Flax UNet2DConditionModel against PyTorch diffusers on the same random weights.

Every torch param is randomized (diffusers zero-inits proj_out and conv_out, which would hide
bugs behind them), the model is saved as a diffusers folder, loaded with ``load_unet`` and both
run on the same inputs (NCHW vs NHWC).
"""
import json
import math
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpref.models import weights
from jaxpref.models.presets import SD15_UNET, SD21_UNET, SDXL_UNET
from jaxpref.models.unet import (REMAT_POLICIES, UNet2DConditionModel, count_params, load_unet, save_unet,
                                 timestep_embedding, unet_from_config, unet_param_shapes)

torch.set_num_threads(1)

# Tiny configs, each exercising one family's options.
SD15_LIKE = dict(  # conv proj_in/out, attention_head_dim = heads (int), 2 resnets per block
    block_out_channels=[32, 64], layers_per_block=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8, sample_size=8)
SD2_LIKE = dict(  # linear proj, per-block heads, several transformer layers per block, upcast flag
    block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=24,
    attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 2], use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8, sample_size=8)
SDXL_LIKE = dict(  # text_time addition embedding (pooled text + 6 size/crop ids)
    block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
    attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    norm_num_groups=8, sample_size=8)

# Per config: latent side (H, W) and timesteps. SD2_LIKE's 10 x 12 is not a multiple of 4 (two
# upsamplers), which takes diffusers' upsample_size path; SDXL_LIKE uses one scalar timestep.
CASES = {
    "sd15": (SD15_LIKE, (8, 8), [999, 10]),
    "sd2": (SD2_LIKE, (10, 12), [500.5, 3.25]),
    "sdxl": (SDXL_LIKE, (8, 8), 37),
}


def randomize_(model: torch.nn.Module, seed: int = 0):
    """Every param random: norm scales 1 + N(0, 0.1), biases N(0, 0.1), weights N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def make_inputs(config, side, timesteps, seed=0):
    """Returns (torch kwargs, jax args) for the same random inputs."""
    rng = np.random.default_rng(seed)
    b = 2
    latents = rng.standard_normal((b, 4, *side), dtype=np.float32)
    context = rng.standard_normal((b, 7, config["cross_attention_dim"]), dtype=np.float32)
    t = np.asarray(timesteps)
    added = None
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((b, text_dim), dtype=np.float32),
                 "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 1024]], np.float32)}
    torch_kwargs = dict(sample=torch.from_numpy(latents), timestep=torch.from_numpy(t),
                        encoder_hidden_states=torch.from_numpy(context),
                        added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()})
    jax_args = (jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context), added)
    return torch_kwargs, jax_args


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_torch(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample.numpy().transpose(0, 2, 3, 1)


def run_jax(module, params, args):
    return np.asarray(jax.jit(module.apply)({"params": params}, *args))


_BUILT = {}


def build_case(name, tmp_path_factory):
    """A randomized diffusers UNet saved to disk, loaded with load_unet, its inputs and both outputs."""
    if name not in _BUILT:
        config, side, timesteps = CASES[name]
        torch.manual_seed(0)
        model = diffusers.UNet2DConditionModel(**config).eval()
        randomize_(model)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        module, params = load_unet(folder)
        torch_kwargs, jax_args = make_inputs(config, side, timesteps)
        _BUILT[name] = dict(name=name, config=config, model=model, folder=folder, module=module, params=params,
                            torch_kwargs=torch_kwargs, jax_args=jax_args, ref=run_torch(model, torch_kwargs),
                            out=run_jax(module, params, jax_args))
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd15_case(tmp_path_factory):
    return build_case("sd15", tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Parity.


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0, 1, 17.5, 999], np.float32)
    for dim, flip, shift in ((320, True, 0), (33, False, 1)):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ours = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift))
        # A 1-ulp difference in one frequency moves the phase at t = 999 by up to 6e-5.
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours[:3], ref.numpy()[:3], atol=3e-6)


def test_parity_with_diffusers(case):
    assert case["out"].shape == case["ref"].shape
    err = rel_err(case["out"], case["ref"])
    assert err <= 1e-4, f"{case['name']}: relative error {err:.2e}"
    assert np.linalg.norm(case["ref"]) > 1.0  # the randomized net carries signal to its output


def test_save_unet_round_trips_through_diffusers(case, tmp_path):
    save_unet(str(tmp_path), case["module"], case["params"])
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    original = case["model"].state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    np.testing.assert_array_equal(run_torch(reloaded, case["torch_kwargs"]), case["ref"])
    with open(tmp_path / "config.json") as f:
        assert unet_from_config(json.load(f)) == case["module"]
    module, params = load_unet(str(tmp_path))
    assert module == case["module"]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(case["params"])):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Full-size configs: param counts and every tensor name/shape, without allocating.


def _torch_layout_shapes(tree):
    """{checkpoint key: torch shape}, by weights.py's own layout rule applied to zero-stride views."""
    zero = np.zeros((), np.float32)
    out = {}
    for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(k.key for k in path)
        torch_view = weights.flax_to_torch_array(names[-1], np.broadcast_to(zero, s.shape))
        out[weights.torch_key(names)] = torch_view.shape
    return out


@pytest.mark.parametrize("name,config,expected", [("sd15", SD15_UNET, 859_520_964),
                                                   ("sd21", SD21_UNET, 865_910_724),
                                                   ("sdxl", SDXL_UNET, 2_567_463_684)])
def test_full_size_param_shapes(name, config, expected):
    shapes = unet_param_shapes(config)
    assert count_params(shapes) == expected
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
    assert _torch_layout_shapes(shapes) == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ValueError, match="no such UNet folder"):
        load_unet(str(tmp_path / "absent"))
    weights.write_config(str(tmp_path), SD15_LIKE)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_unet(str(tmp_path))


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
    ("cross_attention_norm", "group_norm"), ("time_embedding_type", "fourier"), ("addition_embed_type", "text"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("only_cross_attention", True), ("dropout", 0.1), ("act_fn", "gelu"), ("transformer_layers_per_block", [[1], [1]]),
])
def test_unsupported_config_value(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")) as e:
        unet_from_config({**SD15_LIKE, key: value})
    assert "supported" in str(e.value)


def test_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match="unknown UNet config keys.*'frobnicate'"):
        unet_from_config({**SD15_LIKE, "frobnicate": 1})
    weights.write_config(str(tmp_path), {**SD15_LIKE, "frobnicate": 1})
    with pytest.raises(ValueError, match="config.json.*frobnicate"):
        load_unet(str(tmp_path))


def test_wrong_tensor_shape(sd15_case, tmp_path):
    case = sd15_case
    shutil.copy(os.path.join(case["folder"], "config.json"), tmp_path)
    tensors = dict(weights.read_safetensors(os.path.join(case["folder"], "diffusion_pytorch_model.safetensors")))
    tensors["conv_in.weight"] = np.zeros((16, 4, 3, 3), np.float32)
    weights.write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    with pytest.raises(ValueError, match=r"conv_in.weight.*\(16, 4, 3, 3\).*\(3, 3, 4, 32\)"):
        load_unet(str(tmp_path))
    bad = jax.tree_util.tree_map(lambda x: x, case["params"])
    bad["conv_out"]["bias"] = jnp.zeros(5)
    with pytest.raises(ValueError, match=r"conv_out.bias.*\(5,\).*\(4,\)"):
        save_unet(str(tmp_path / "out"), case["module"], bad)


# ---------------------------------------------------------------------------------------------
# remat and bf16.


@pytest.mark.compiled_for_few_runs
def test_remat_same_output_and_gradient():
    # One cross-attention level (resnets + transformers, the remat'ed modules): compiles in seconds.
    module = UNet2DConditionModel(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                  cross_attention_dim=8, num_attention_heads=2, transformer_layers_per_block=2,
                                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.standard_normal((2, 4, 4, 4), np.float32)), jnp.array([3, 700]),
            jnp.asarray(rng.standard_normal((2, 3, 8), np.float32)))
    params = jax.jit(module.init)(jax.random.PRNGKey(0), *args)["params"]

    def loss(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, *args) ** 2)))(params)

    (value, grads), (value_r, grads_r) = loss(module), loss(module.clone(remat=True))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads_r) == jax.tree_util.tree_structure(grads)
    for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)


def _remat_policies(jaxpr) -> list:
    """The ``policy`` of every rematerialised region (jax's remat primitive) in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("remat", "checkpoint")):
            found.append(eqn.params.get("policy"))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _remat_policies(inner)
    return found


def test_remat_policy_reaches_every_block():
    """Each resnet and transformer block (1 + 1 down, 2 + 1 mid, 2 + 2 up) is one rematerialised region
    whose policy is the configured one (memory per policy, compiled for TPU: docs/performance.md)."""
    module = UNet2DConditionModel(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                  cross_attention_dim=8, num_attention_heads=2,
                                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    args = (jnp.zeros((1, 4, 4, 4)), jnp.array([3]), jnp.zeros((1, 3, 8)))
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))

    def policies(m):
        return _remat_policies(jax.make_jaxpr(lambda p: m.apply(p, *args))(params).jaxpr)

    assert policies(module) == []
    for name in REMAT_POLICIES:
        want = None if name == "nothing_saveable" else getattr(jax.checkpoint_policies, name, REMAT_POLICIES[name])
        assert policies(module.clone(remat=True, remat_policy=name)) == [want] * 9, name
    with pytest.raises(ValueError, match="remat policy 'everything'"):
        policies(module.clone(remat=True, remat_policy="everything"))


def test_bf16_compute_close_to_fp32(sd15_case):
    case = sd15_case
    module = case["module"].clone(dtype=jnp.bfloat16)
    out = run_jax(module, case["params"], case["jax_args"])
    assert out.dtype == np.float32
    err = rel_err(out, case["out"])
    assert err < 3e-2, err
