"""LoRA (jaxpref.lora) on the tiny random SD pipeline, against PEFT / diffusers as the oracle.

PEFT's layers compute W x + (α/r) B A x; ours run the same branch through a Flax interceptor. The oracle
is diffusers' own LoRA loading (``load_lora_weights``) and PEFT-written adapter files, on the same weights.
"""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import train_helpers as th
from jaxpref import checkpoint as checkpoint_lib, export as export_lib, lora, sharding, train as train_lib, trainer
from jaxpref.evaluate import generate, initial_noise, latent_shape
from jaxpref.models import load_pipeline
from jaxpref.models.unet import load_unet

RANK, ALPHA = 4, 8.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the cat", "a cat", "the"]


def lora_config(**overrides):
    return ml_collections.ConfigDict(dict(dict(enabled=True, rank=RANK, alpha=ALPHA, target_modules=lora.DEFAULT_TARGETS,
                                               dropout=0.0, init_from=""), **overrides))


@pytest.fixture(scope="module")
def pipe(world):
    return load_pipeline(world[0])


def trained_like(adapters, seed=1, scale=0.1):
    """A stand-in for trained adapters: every A and B (B no longer zero) moved by seeded noise."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def unet_inputs(pipe, seed=0):
    """(x [2, 8, 8, c], t [2], text [2, L, D]) fp32 numpy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, pipe.unet.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 7, pipe.unet.cross_attention_dim)).astype(np.float32)
    return x, np.array([17, 640], np.int32), text


@functools.partial(jax.jit, static_argnums=0)
def _apply(unet, params, *inputs):
    return lora.apply(unet, params, *inputs)


def ours(pipe, params, inputs, unet=None):
    """Our UNet (``unet`` or the pipeline's) on ``inputs``, jitted: one compile per params structure instead
    of op-by-op dispatch."""
    return np.asarray(_apply(unet or pipe.unet, params, *(jnp.asarray(v) for v in inputs)))


def torch_unet_out(unet, inputs):
    x, t, text = inputs
    with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64)),
                   encoder_hidden_states=torch.from_numpy(text)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.compiled_for_few_runs
def test_fresh_adapters_are_the_base_exactly(pipe):
    """A ~ U(±1/√fan_in) (PEFT's kaiming-uniform, a=√5), B = 0: the policy's output equals the base's bit for bit."""
    adapters = lora.init_adapters(jax.random.PRNGKey(0), pipe.unet_params, lora_config(target_modules=lora.SUPPORTED_TARGETS))
    flat = lora.flatten(adapters)
    assert any(ab["lora_A"].ndim == 4 for ab in flat.values())  # ResNet convs adapted too
    for ab in flat.values():
        a = np.asarray(ab["lora_A"])
        bound = 1 / math.sqrt(np.prod(a.shape[:-1]))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
        assert not np.any(np.asarray(ab["lora_B"]))
    inputs = unet_inputs(pipe)
    policy = lora.policy(adapters, pipe.unet_params, lora_config())
    np.testing.assert_array_equal(ours(pipe, policy, inputs), ours(pipe, pipe.unet_params, inputs))


@pytest.mark.compiled_for_few_runs
def test_merged_equals_unmerged(pipe):
    """W + (α/r)·B A written into the kernels against the unmerged branch, fp32, remat on and off."""
    cfg = lora_config(target_modules=lora.SUPPORTED_TARGETS)
    adapters = trained_like(lora.init_adapters(jax.random.PRNGKey(0), pipe.unet_params, cfg))
    inputs = unet_inputs(pipe)
    merged = ours(pipe, lora.merge(pipe.unet_params, adapters, ALPHA / RANK), inputs)
    base = ours(pipe, pipe.unet_params, inputs)
    assert rel(merged, base) > 1e-2  # the adapters matter
    for remat in (False, True):
        unmerged = ours(pipe, lora.policy(adapters, pipe.unet_params, cfg), inputs, pipe.unet.clone(remat=remat))
        assert rel(unmerged, merged) <= 1e-5
    # lora.dropout drops the branch's inputs in training (a key given) and nowhere else.
    dropped = lora.policy(adapters, pipe.unet_params, lora_config(target_modules=lora.SUPPORTED_TARGETS, dropout=0.5),
                          jax.random.PRNGKey(3))
    assert rel(ours(pipe, dropped, inputs), merged) > 1e-3
    assert rel(ours(pipe, lora.without_dropout(dropped), inputs), merged) <= 1e-5


def test_diffusers_loads_our_export(pipe, world, tmp_path):
    """Our adapters -> pytorch_lora_weights.safetensors -> diffusers load_lora_weights: same UNet output, and the
    same DDIM images as jaxpref generating with the adapters."""
    from diffusers import StableDiffusionPipeline

    cfg = lora_config(target_modules=lora.SUPPORTED_TARGETS)
    adapters = trained_like(lora.init_adapters(jax.random.PRNGKey(0), pipe.unet_params, cfg), scale=0.05)
    path = lora.save_diffusers_lora(str(tmp_path), adapters, RANK, ALPHA)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    sd = StableDiffusionPipeline.from_pretrained(world[0])
    sd.load_lora_weights(str(tmp_path))
    inputs = unet_inputs(pipe)
    assert rel(ours(pipe, lora.policy(adapters, pipe.unet_params, cfg), inputs), torch_unet_out(sd.unet, inputs)) <= 1e-4
    # Generation: same x_T, DDIM 4 steps, CFG 7.5 (the export test's tolerance).
    merged = lora.merge(pipe.unet_params, adapters, ALPHA / RANK)
    gen = generate(pipe, PROMPTS, unet_params=merged, sampler="ddim", num_steps=4, guidance_scale=7.5, seed=3,
                   batch_size=4)
    x_T = np.asarray(initial_noise(gen.seeds[:, 0], latent_shape(pipe, None, None)))
    with torch.no_grad():
        ref = sd(prompt=PROMPTS, latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
                 guidance_scale=7.5, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(gen.latents[:, 0], ref, atol=1e-4)  # test_export.py's tolerance


def test_peft_written_lora_loads_into_jaxpref(pipe, world, tmp_path):
    """A LoRA that PEFT puts on the diffusers UNet (r=2, α=6, convs included), saved by diffusers, loads into
    jaxpref with the same outputs, and a run resumes from it (config.lora.init_from)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "ff.net.2"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(world[0], "unet")).eval()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    meta = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=meta)
    adapters, rank, alpha = lora.load_diffusers_lora(str(tmp_path), pipe.unet_params)
    assert (rank, alpha) == (2, 6.0)
    cfg = lora_config(rank=2, alpha=6.0, target_modules=tuple(targets), init_from=str(tmp_path))
    inputs = unet_inputs(pipe)
    assert rel(ours(pipe, lora.policy(adapters, pipe.unet_params, cfg), inputs), torch_unet_out(unet, inputs)) <= 1e-4
    resumed = lora.initial_adapters(cfg, pipe.unet_params, seed=0)
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="config.lora.init_from.*rank 2"):
        lora.initial_adapters(lora_config(init_from=str(tmp_path)), pipe.unet_params, seed=0)


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    """3 LoRA DPO updates on the shapes world with the tiny random pipeline (checkpoint + exports at the end)."""
    workdir = str(tmp_path_factory.mktemp("lora_run") / "run")
    config = th.tiny_dpo_config(world[0], world[1], **{"lora.enabled": True, "lora.rank": RANK, "lora.alpha": ALPHA,
                                                       "total_steps": 3, "optimizer.lr": 1e-2})
    return workdir, train_lib.train(config, workdir)


def test_lora_run_trains_only_the_adapters(lora_run, pipe, world):
    workdir, summary = lora_run
    # B = 0: policy = reference at step 1, log 2 up to fp32 rounding of the two forwards (fused apart) times
    # β/2 = 250, the full fine-tune's tolerance (test_train); bit-exact equality is test_fresh_adapters_...
    assert summary["history"][0]["loss"] == pytest.approx(math.log(2), abs=2e-5)
    shapes = jax.eval_shape(lambda p: lora.init_adapters(jax.random.PRNGKey(0), p, lora_config()), pipe.unet_params)
    adapters = checkpoint_lib.load_policy_params(workdir, shapes, use_ema=False)
    assert all(str(getattr(p[-1], "key", p[-1])) in ("lora_A", "lora_B")
               for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0])
    saved = checkpoint_lib._saved_state(os.path.join(workdir, "checkpoints"), 3)
    opt_sizes = [int(np.prod(m.shape)) for m in jax.tree_util.tree_leaves(saved["opt_state"]) if len(m.shape)]
    assert sum(opt_sizes) == 2 * lora.count(shapes)                    # AdamW: μ and ν of the adapters only
    assert all(np.any(np.asarray(ab["lora_B"])) for ab in lora.flatten(adapters).values())
    # The exported merged UNet: adapted kernels moved, every other base param bit-identical.
    _, exported = load_unet(os.path.join(workdir, "export", "unet"))
    adapted = set(lora.flatten(adapters))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(exported)[0],
                                 jax.tree_util.tree_leaves(pipe.unet_params)):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if names[:-1] in adapted and names[-1] == "kernel":
            assert not np.array_equal(np.asarray(got), np.asarray(want)), names
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = lora.merge(pipe.unet_params, adapters, ALPHA / RANK)
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isfile(os.path.join(workdir, "export", lora.WEIGHT_NAME))


def test_export_cli_writes_adapters_or_the_merged_pipeline(lora_run, pipe, world, tmp_path):
    workdir, _ = lora_run
    out = str(tmp_path / "adapters")
    cmd = [sys.executable, "-m", "jaxpref.export", f"--checkpoint={workdir}", f"--base={world[0]}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapters, rank, alpha = lora.load_diffusers_lora(out, pipe.unet_params)
    assert (rank, alpha) == (RANK, ALPHA)
    saved = checkpoint_lib.load_policy_params(workdir, None, use_ema=False)
    for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(a, np.asarray(b))
    merged_dir = export_lib.export(workdir, str(tmp_path / "merged"), world[0], merge=True)
    _, merged = load_unet(os.path.join(merged_dir, "unet"))
    _, exported = load_unet(os.path.join(workdir, "export", "unet"))
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="--merge"):
        export_lib.export(out, str(tmp_path / "again"), world[0])


@pytest.mark.compiled_for_few_runs
@pytest.mark.parametrize("objective", ["dro", "smpo"])
def test_dro_and_smpo_steps_train_adapters(objective, pipe):
    """DRO with a stale sampling copy (θ = adapters on the shared base, sampled through ``eps_fn``) and SmPO
    take finite steps that move the adapters only."""
    c = th.tiny_dpo_config("embedded:tiny", "", **{"objective": objective, "lora.enabled": True, "batch_size": 2,
                                                  "optimizer.lr": 1e-2, "dro.refresh_every": 2, "dro.buffer_size": 2,
                                                  "dro.num_inference_steps": 2, "data.resolution": 32})
    run = trainer.build_run(c, pipe)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _, _ = trainer.init_state(run, mesh)
    frozen = trainer.frozen_params(run)
    rng = np.random.default_rng(0)
    h, w, ch = run.latent_shape
    shape = (2, h, w, ch) if run.method.data == "experts" else (2, 2, h, w, ch)
    batch = {"input_ids": np.tile(run.null_ids[None], (2, 1)),
             "latent_mean": rng.standard_normal(shape).astype(np.float32), "latent_std": np.full(shape, 0.1, np.float32)}
    if run.method.needs_rewards:
        batch["rewards"] = np.array([[0.7, 0.2], [0.4, 0.6]], np.float32)
    start = jax.device_get(state.params)
    step = trainer.compile_train_step(run, mesh, state, batch, frozen)
    for i in range(2):
        state, metrics = step(state, batch, jax.random.PRNGKey(i), frozen)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(start)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(state.params)))
    if objective == "dro":
        assert jax.tree_util.tree_structure(state.method_state.sampler) == jax.tree_util.tree_structure(start)


@pytest.mark.parametrize("key, value, message", [
    ("lora.rank", 0, "config.lora.rank=0"),
    ("lora.target_modules", ("to_q", "proj_in"), "config.lora.target_modules"),
    ("lora.dropout", 1.0, "config.lora.dropout"),
    ("reference_path", "/some/unet", "config.reference_path.*is the reference"),
    ("lora.init_from", "/no/such/lora.safetensors", "config.lora.init_from"),
])
def test_bad_lora_config_fails_naming_the_key(key, value, message):
    from jaxpref import config_lib

    c = config_lib.load_config("tiny:dpo")
    c.lora.enabled = True
    config_lib.validate(c)
    node, *path = key.split(".")[::-1]
    target = c
    for part in reversed(path):
        target = target[part]
    target[node] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
