"""SDXL end to end on a tiny random StableDiffusionXLPipeline (tests/tiny_sd.py ``build_tiny_sdxl``), against
diffusers PyTorch on the same folder: conditioning (encode_prompt, time ids, CFG's zeroed empty prompt), a
full DDIM + CFG denoising run, the save -> from_pretrained round trip, one train step of each objective
(DPO's first loss log 2), and 8 simulated devices against 1 (a child process).

    python tests/test_sdxl.py FOLDER DATA FSDP   # the child: prints the DPO loss on a DATA x FSDP mesh
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import train_helpers as th
from jaxpref import evaluate, export, lora, sharding, step as step_lib, trainer
from jaxpref.data.tokenizer import tokenize
from jaxpref.models import conditioning, load_pipeline
from test_lora import trained_like
from test_step import make_batch, make_config
from tiny_sd import build_tiny_sdxl

jax.config.update("jax_threefry_partitionable", True)

PROMPTS = ["the cat", "a cat the cat the cat the cat the cat", ""]  # the second one is truncated


def rel(ours, theirs) -> float:
    theirs = np.asarray(theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def torch_pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    tp.scheduler = DDIMScheduler.from_config(tp.scheduler.config)  # the evaluation sampler, same schedule
    return tp.set_progress_bar_config(disable=True) or tp


def our_cond(pipe, prompts, size=(64, 64), crop=(0, 0), target=(64, 64)):
    emb = jax.jit(pipe.text_encoder.apply)({"params": pipe.text_encoder_params}, tokenize(pipe.tokenizer, prompts))
    return conditioning.with_time_ids(emb, conditioning.time_ids(size, crop, target))


def test_conditioning_equals_diffusers_encode_prompt_and_time_ids(pipe, torch_pipe):
    assert pipe.is_sdxl and pipe.tokenizer_2.pad_token_id != pipe.tokenizer.pad_token_id
    cond = our_cond(pipe, PROMPTS, (48, 40), (3, 5), (64, 56))
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = torch_pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ids = torch_pipe._get_add_time_ids((48, 40), (3, 5), (64, 56), dtype=torch.float32,
                                       text_encoder_projection_dim=pooled.shape[-1])
    assert cond["context"].shape == (3, 12, 40) and cond["text_embeds"].shape == (3, 8)
    assert rel(cond["context"], embeds) <= 1e-5
    assert rel(cond["text_embeds"], pooled) <= 1e-5
    np.testing.assert_array_equal(np.asarray(cond["time_ids"]), np.broadcast_to(ids.numpy(), (3, 6)))
    # force_zeros_for_empty_prompt: CFG's unconditional input is zeros, not the encoded "".
    null = tokenize(pipe.tokenizer, [""])[0]
    uncond = conditioning.unconditional(pipe.text_encoder, pipe.text_encoder_params, null, cond)
    assert not neg_embeds.abs().max() and not neg_pooled.abs().max()
    assert not np.abs(uncond["context"]).max() and not np.abs(uncond["text_embeds"]).max()
    np.testing.assert_array_equal(uncond["time_ids"], cond["time_ids"])
    assert np.abs(cond["context"][2]).max() > 0  # the encoded "" (training's prompt dropout) is not zero


def test_tokenizers_that_differ_beyond_padding_are_refused(folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config_path = bad / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_max_length": 8}))
    with pytest.raises(ValueError, match="tokenizer_2/ differ in more than the padding token"):
        load_pipeline(str(bad))


def test_evaluate_generate_matches_diffusers_ddim_cfg_latents(pipe, torch_pipe):
    """jaxpref.evaluate.generate (DDIM 10 steps, CFG 5, the seeds protocol) against StableDiffusionXLPipeline
    started from the same x_T: output latents."""
    prompts, steps, scale = PROMPTS[:2], 10, 5.0
    gen = evaluate.generate(pipe, prompts, sampler="ddim", num_steps=steps, guidance_scale=scale, seed=3,
                            batch_size=2, height=32, width=32)
    x_T = evaluate.initial_noise(gen.seeds[:, 0], (8, 8, 4))
    with torch.no_grad():
        theirs = torch_pipe(prompts, num_inference_steps=steps, guidance_scale=scale, height=32, width=32,
                            latents=torch.from_numpy(np.array(x_T)).permute(0, 3, 1, 2), output_type="latent").images
    assert gen.images.shape == (2, 1, 32, 32, 3)
    assert rel(gen.latents[:, 0], theirs.permute(0, 2, 3, 1)) <= 1e-4


def test_export_then_diffusers_from_pretrained_gives_identical_outputs(folder, pipe, torch_pipe, tmp_path):
    """A fine-tuned UNet exported with the SDXL base: StableDiffusionXLPipeline loads it, with our UNet params
    and the base's other parts unchanged (same outputs as the base folder loaded by diffusers)."""
    from diffusers import StableDiffusionXLPipeline

    from jaxpref.models.unet import save_unet

    tuned = jax.tree_util.tree_map(lambda p: np.asarray(p) + np.float32(0.01), pipe.unet_params)  # on the host
    save_unet(str(tmp_path / "tuned_unet"), pipe.unet, tuned)
    out = export.export(str(tmp_path / "tuned_unet"), str(tmp_path / "out"), base=folder)
    again = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(again.scheduler).__name__ == "EulerDiscreteScheduler" and again.config.force_zeros_for_empty_prompt
    with torch.no_grad():
        a = torch_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        b = again.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        v1, v2 = torch_pipe.vae.decode(x).sample, again.vae.decode(x).sample
        added = {"text_embeds": b[2][:2], "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        theirs = again.unet(x, torch.tensor([10, 900]), b[0][:2], added_cond_kwargs=added).sample
    for ours, loaded in ((a[0], b[0]), (a[2], b[2]), (v1, v2)):
        assert torch.equal(ours, loaded)
    cond = {"context": b[0][:2].numpy(), "text_embeds": b[2][:2].numpy(), "time_ids": added["time_ids"].numpy()}
    ours = jax.jit(conditioning.apply_unet, static_argnums=0)(pipe.unet, tuned, x.permute(0, 2, 3, 1).numpy(),
                                                              jnp.array([10, 900]), cond)
    assert rel(ours, theirs.permute(0, 2, 3, 1)) <= 1e-5
    assert load_pipeline(out).is_sdxl


def test_lora_on_sdxl_exports_what_diffusers_loads(folder, pipe, tmp_path):
    """LoRA on the SDXL UNet (every attention projection, both encoders' context): our adapters, written as
    pytorch_lora_weights.safetensors, loaded by StableDiffusionXLPipeline.load_lora_weights, give diffusers'
    UNet our UNet-with-adapters output (fp32 <= 1e-4), with the text_embeds / time_ids conditioning."""
    from diffusers import StableDiffusionXLPipeline

    rank, alpha = 4, 8.0
    cfg = make_config("dpo", **{"lora.enabled": True, "lora.rank": rank, "lora.alpha": alpha}).lora
    adapters = trained_like(lora.init_adapters(jax.random.PRNGKey(0), pipe.unet_params, cfg), scale=0.05)
    lora.save_diffusers_lora(str(tmp_path), adapters, rank, alpha)
    theirs_pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    theirs_pipe.load_lora_weights(str(tmp_path))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, pipe.unet.in_channels)).astype(np.float32)
    cond = {"context": rng.standard_normal((2, 7, pipe.unet.cross_attention_dim)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, pipe.text_encoder.projection_dim)).astype(np.float32),
            "time_ids": np.array([[64.0, 64, 0, 0, 64, 64], [80, 72, 4, 8, 64, 64]], np.float32)}
    t = np.array([10, 900])
    with torch.no_grad():
        added = {"text_embeds": torch.from_numpy(cond["text_embeds"]), "time_ids": torch.from_numpy(cond["time_ids"])}
        theirs = theirs_pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                                  torch.from_numpy(cond["context"]), added_cond_kwargs=added).sample
    args, kwargs = conditioning.unet_inputs(cond)
    policy = lora.policy(adapters, pipe.unet_params, cfg)
    # Compiled forwards (op by op, each of the UNet's ops would compile on its own).
    ours = jax.jit(lora.apply, static_argnums=0)(pipe.unet, policy, jnp.asarray(x), jnp.asarray(t), *args, **kwargs)
    base = jax.jit(conditioning.apply_unet, static_argnums=0)(pipe.unet, pipe.unet_params, x, t, cond)
    assert rel(base, theirs.permute(0, 2, 3, 1)) > 1e-2  # the adapters change the output
    assert rel(ours, theirs.permute(0, 2, 3, 1)) <= 1e-4


def sdxl_run(pipe, objective, **overrides):
    run = trainer.build_run(make_config(objective, **overrides), pipe)
    state = step_lib.init_train_state(run.pipeline.unet_params, run.optimizer, run.config, run.method,
                                      text_shape=run.text_shape, latent_shape=run.latent_shape)
    return run, state, trainer.frozen_params(run)


@pytest.mark.compiled_for_few_runs
@pytest.mark.parametrize("objective", ["smpo", "dro"])  # DPO's step: test_eight_devices_match_one
def test_one_train_step_of_smpo_and_dro(pipe, objective):
    """SmPO inverts and DRO samples (with CFG, SDXL's zeroed uncond) on the conditioning pytree."""
    overrides = {"prompt_dropout": 0.5, "dro.guidance_scale": 2.0} if objective == "dro" else {}
    if objective == "smpo":
        overrides = {"smpo.inversion_steps": 2}
    run, state, frozen = sdxl_run(pipe, objective, **overrides)
    if objective == "dro":  # the buffer holds SDXL's conditioning pytree, one row per trajectory
        assert state.method_state.negatives.text["context"].shape == (4, 12, 40)
    step = jax.jit(step_lib.make_train_step(run.config, run.method, run.optimizer))
    batch = make_batch(run, pairs=objective != "dro")
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0), frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0
    assert float(metrics["grad_norm"]) > 0
    if objective == "dro":
        assert float(metrics["buffer_filled"]) == 4
        assert np.abs(np.asarray(new_state.method_state.negatives.text["time_ids"])).max() == 32


def mesh_dpo_loss(folder: str, data: int, fsdp: int) -> float:
    """The first DPO loss (after one update, so the policy differs from the reference) of the tiny SDXL
    pipeline on a data x fsdp mesh, the state and batch sharded as the train loop shards them."""
    run, state, frozen = sdxl_run(load_pipeline(folder), "dpo", batch_size=8,
                                  **{"optimizer.lr": 1e-2, "dpo.beta": 500.0, "prompt_dropout": 0.25})
    run.config.unlock()
    run.config.sharding_rules = th.fsdp_rules(64)
    mesh = sharding.make_mesh(data, fsdp)
    state, _, shardings = trainer.init_state(run, mesh)
    batch = make_batch(run, num_pairs=8)
    compiled = trainer.compile_train_step(run, mesh, state, batch, frozen)
    losses = []
    for i in range(2):
        state, metrics = compiled(state, batch, jax.random.PRNGKey(i), frozen)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.compiled_for_few_runs
def test_eight_devices_match_one(folder):
    """DPO on SDXL: the first loss is log 2 (policy = reference), and a data=2 x fsdp=4 mesh of 8 simulated
    devices gives the 1-device losses of both steps (the second after a sharded update)."""
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, os.path.join(here, "test_sdxl.py"), folder, "2", "4"],
                             env=th.subprocess_env(8, llvm_level_0=True), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=here)
    one = mesh_dpo_loss(folder, 1, 1)  # while the child compiles
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    eight = json.loads(out.strip().splitlines()[-1])
    assert eight["devices"] == 8
    assert one[0] == pytest.approx(math.log(2), abs=2e-5)  # fp32 rounding of the two forwards, times β/2
    np.testing.assert_allclose(eight["losses"], one, rtol=1e-4)
    assert abs(one[1] - one[0]) > 1e-4


if __name__ == "__main__":
    th.compile_as_the_parent_asked()
    losses = mesh_dpo_loss(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps({"losses": losses, "devices": jax.device_count()}))


def test_adafactor_is_the_sdxl_scripts_optimizer():
    """optimizer.name="adafactor" = transformers.Adafactor(scale_parameter=False, relative_step=False), what the
    DPO and SmPO SDXL scripts train with (lr-scaled decoupled weight decay, update RMS clipped to 1)."""
    import ml_collections
    import optax
    from transformers.optimization import Adafactor

    from jaxpref import optim

    cfg = ml_collections.ConfigDict(dict(name="adafactor", lr=1e-2, weight_decay=1e-2, grad_clip=0.0,
                                         warmup_steps=0, schedule="constant", decay_steps=10))
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((256, 160)).astype(np.float32), "b": rng.standard_normal(160).astype(np.float32)}
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    reference = Adafactor(list(torch_params.values()), lr=1e-2, weight_decay=1e-2, clip_threshold=1.0,
                          scale_parameter=False, relative_step=False)
    opt = optim.make_optimizer(cfg)
    params = jax.tree_util.tree_map(jnp.asarray, start)
    state = opt.init(params)
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        reference.step()
        updates, state = opt.update(jax.tree_util.tree_map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    for k, p in torch_params.items():
        moved = p.detach().numpy() - start[k]
        assert np.abs(np.asarray(params[k]) - p.detach().numpy()).max() <= 1e-4 * np.abs(moved).max()


def test_vae_path_and_dtype_replace_the_pipelines_vae(folder, tmp_path):
    """config.vae_path (e.g. SDXL's fp16-fix VAE) and vae_dtype reach load_pipeline; a bad path is named."""
    from jaxpref.models.vae import save_vae

    pipe = load_pipeline(folder)
    other = jax.tree_util.tree_map(lambda p: p * 1.5, pipe.vae_params)
    save_vae(str(tmp_path / "vae_fix"), pipe.vae, other)
    swapped = load_pipeline(folder, vae_path=str(tmp_path / "vae_fix"), vae_dtype=jnp.bfloat16)
    assert swapped.vae.dtype == jnp.bfloat16 and swapped.unet.dtype == jnp.float32
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(swapped.vae_params)[0], jax.tree_util.tree_leaves(other)[0])
    with pytest.raises(ValueError, match="vae_path="):
        load_pipeline(folder, vae_path=str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Data: each image's crop recorded as SDXL's time ids (loader, latent cache) and fed to the conditioning.

RES = 16
SIZES = [(40, 62), (50, 30)]  # (h, w) of rows 0, 2 / 1, 3: wide with an odd resize margin (its mirrored crop
                              # starts elsewhere), tall


def _pair_rows(n=4):
    from jaxpref.data import common

    rng = np.random.default_rng(0)
    image = lambda h, w: common.encode_image(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return [{"caption": "the cat", "jpg_0": image(*SIZES[i % 2]), "jpg_1": image(*SIZES[i % 2]),
             "label_0": np.float32(1), "reward_0": np.float32(np.nan), "reward_1": np.float32(np.nan)}
            for i in range(n)]


def _resized(data: bytes) -> np.ndarray:
    """The oracle: PIL's bilinear resize of the shorter side to RES, computed here without our helpers."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        size = (RES, round(h * RES / w)) if w <= h else (round(w * RES / h), RES)
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), np.uint8)


def _check_crop(image, time_ids, data):
    """image is the RES crop at time_ids' (top, left) of the resized source, or of its mirror image."""
    resized = _resized(data)
    h0, w0, top, left, th, tw = (int(v) for v in time_ids)
    assert (h0, w0, th, tw) == (*SIZES[0 if _resized(data).shape[1] > RES else 1], RES, RES)
    crops = [r[top:top + RES, left:left + RES] for r in (resized, resized[:, ::-1])]
    assert any(np.array_equal(image, c) for c in crops), (time_ids, resized.shape)


def test_loader_and_cache_record_each_images_crop_as_time_ids(tmp_path, monkeypatch):
    from jaxpref.data import build_latent_cache, cache, make_loader, open_source
    from jaxpref.data.sources import Source

    from test_data_derived import encode

    rows = _pair_rows()
    src = Source(rows, name="mem/pairs", split="train", kind="pairs")
    seen_flip = set()
    for crop in ("center", "random"):
        batch = next(make_loader(src, 4, resolution=RES, crop=crop, time_ids=True, shuffle=False, seed=1,
                                 process_index=0, process_count=1))
        assert batch["time_ids"].shape == (4, 2, 6)
        for b in range(4):
            for k in range(2):
                _check_crop(batch["images"][b, k], batch["time_ids"][b, k], rows[b][f"jpg_{k}"])
                top, left = (int(v) for v in batch["time_ids"][b, k, 2:4])
                mirrored = _resized(rows[b][f"jpg_{k}"])[:, ::-1][top:top + RES, left:left + RES]
                seen_flip.add(bool(np.array_equal(batch["images"][b, k], mirrored)))
    assert seen_flip == {True, False}
    # The latent cache stores the center crop's ids and its mirror's; the loader picks them with the flip.
    monkeypatch.setattr(cache, "open_source", lambda *a, **k: src)
    build_latent_cache("mem", tmp_path / "cache", encode, resolution=RES, shard_size=4, flips=True)
    cached = open_source(str(tmp_path / "cache"))
    assert cached[0]["time_ids"].tolist() == [[40, 62, 0, 4, 16, 16]] * 2        # resized to 16 x 25
    assert cached[0]["time_ids_flip"].tolist() == [[40, 62, 0, 5, 16, 16]] * 2
    assert cached[1]["time_ids"].tolist() == cached[1]["time_ids_flip"].tolist() == [[50, 30, 5, 0, 16, 16]] * 2
    batch = next(make_loader(cached, 4, time_ids=True, shuffle=False, seed=1, process_index=0, process_count=1))
    for b in range(4):
        flipped = np.array_equal(batch["latent_mean"][b], cached[b]["latent_mean_flip"])
        np.testing.assert_array_equal(batch["time_ids"][b], cached[b]["time_ids_flip" if flipped else "time_ids"])
    with pytest.raises(ValueError, match="no time_ids"):
        old = Source([{k: v for k, v in cached[i].items() if not k.startswith("time_ids")} for i in range(4)],
                     name="old cache", split="train", kind="latents", meta=cached.meta)
        next(make_loader(old, 4, time_ids=True, shuffle=False, process_index=0, process_count=1))


def test_pairs_condition_each_image_on_its_own_time_ids(pipe):
    """A batch's time_ids [B, 2, 6] reach the UNet's conditioning per image (winners first)."""
    run = trainer.build_run(make_config("dpo"), pipe)
    batch = make_batch(run, num_pairs=2)
    ids = np.arange(24, dtype=np.float32).reshape(2, 2, 6)
    micro = dict(batch, time_ids=ids, keys=jnp.zeros((2, 2), jnp.uint32))
    text2, _, _ = run.method.pairs(trainer.frozen_params(run), micro)
    np.testing.assert_array_equal(text2["time_ids"], np.concatenate([ids[:, 0], ids[:, 1]]))
    np.testing.assert_array_equal(text2["context"][:2], text2["context"][2:])
    default, _, _ = run.method.pairs(trainer.frozen_params(run), dict(batch, keys=micro["keys"]))
    assert default["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4
