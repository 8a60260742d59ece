"""Trains the shipped tiny base model (jaxpref/assets/tiny_sd) on the shapes world, on CPU, in minutes.

    python -m jaxpref.world.train_base [--out DIR] [--steps-scale F] [--seed 0] [--data-dir DIR]

Two phases, fp32, deterministic (fixed seeds, fixed data order; XLA on CPU runs the same program the
same way, so a rerun with the same arguments writes byte-identical model files):

1. the VAE (presets.TINY_SD_VAE) as an autoencoder on every shapes/base image (8,496 32x32 renders, half
   clean, half flawed): MSE + L1 reconstruction + KL at SD's relative weight 1e-6; then the latent
   ``scaling_factor`` = 1 / std of the posterior samples, so scaled latents have unit variance as
   SD's 0.18215 gives;
2. the text encoder and the UNet jointly on the same images' cached latent posteriors with the plain
   ε-prediction loss of SD1.5's schedule, caption dropout 0.1 (so classifier-free guidance works).

The model is mediocre on purpose: short training on a mix of clean and flawed renders gives samples
that follow the caption (colour, background, roughly the shape) but with a mean shapes reward well below
clean renders', which leaves preference training headroom. The run measures and records, in
MANIFEST.json: the mean reward of its generations on the held-out prompts (DDIM 25 steps, CFG 3), of VAE
reconstructions of clean renders (the ceiling the VAE allows), of the clean renders themselves, of its
generations scored against shuffled captions (what ignoring the caption would get), and the time per
phase. MANIFEST.json also holds the arguments and the sha256 of every other file in the folder; it is the
one file that differs between reruns (it records times).

Writes a full diffusers StableDiffusionPipeline folder (``save_pipeline``; the tokenizer is a verbatim
copy of jaxpref/assets/shapes_tokenizer): ``jaxpref.models.load_pipeline(out)`` and
``diffusers.StableDiffusionPipeline.from_pretrained(out)`` both load it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpref import diffusion, optim
from jaxpref.data import common
from jaxpref.world import shapes
from jaxpref.data.sources import open_source
from jaxpref.data.tokenizer import SHAPES_TOKENIZER_DIR, load_tokenizer, tokenize
from jaxpref.models import clip, pipeline as pipeline_lib, presets, unet as unet_lib, vae as vae_lib

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = pipeline_lib.TINY_SD_DIR
MANIFEST = "MANIFEST.json"


@dataclasses.dataclass(frozen=True)
class HParams:
    """Training settings. Step counts are multiplied by --steps-scale (at least 1 step each)."""
    # Phase 1: VAE.
    vae_steps: int = 3200
    vae_batch: int = 32
    vae_lr: float = 6e-3
    vae_warmup: int = 50
    vae_l1: float = 1.0            # loss = MSE + vae_l1 * L1 + vae_kl * KL (per value, as SD's sums)
    vae_kl: float = 1e-6           # SD's KL weight, relative to the per-pixel reconstruction sum
    vae_logvar_init: float = -6.0  # posterior std starts at 0.05: early steps are not drowned in latent noise
    vae_crop: int = 16             # the first vae_crop_frac of the steps train on random crops this size
    vae_crop_frac: float = 0.75    # (4x cheaper; the convolutions are the same), the rest on whole images
    vae_b2: float = 0.999
    # Phase 2: text encoder + UNet.
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    unet_warmup: int = 100
    caption_dropout: float = 0.1
    train_text_encoder: bool = True
    unet_ema: float = 0.999        # EMA of text encoder + UNet weights, decay min(ema, (1+s)/(10+s)); 0: off
    unet_b2: float = 0.99
    unet_zero_init: bool = True    # residual branches' last layers and conv_out start at zero (as ADM does)
    text_token_init: float = 0.5   # std of the initial token embeddings (Flax's default gives 0.04, 6x below
                                   # the position embeddings': words would start as noise on position codes)
    # Measurement.
    eval_images_per_prompt: int = 4
    eval_steps: int = 25
    eval_guidance: float = 3.0


# ---------------------------------------------------------------------------------------------
# Data.

def load_base_images(data_dir: Optional[str], limit: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
    """All shapes/base train images in a fixed order (by uid): uint8 [N, 32, 32, 3] and their captions."""
    src = open_source("shapes/base", "train", data_dir)
    records = src.__getitems__(range(len(src)))
    records.sort(key=lambda r: common.as_str(r["uid"]))
    if limit:
        records = records[:limit]
    images = np.stack([common.decode_image(r["jpg"], None) for r in records])
    return images, [common.as_str(r["caption"]) for r in records]


def epoch_batches(n: int, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """[steps, batch] indices: successive shuffled epochs, a fixed order given the rng."""
    need = steps * batch
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return order[:need].reshape(steps, batch)


# Not optim.learning_rate_schedule, which warms up from 0 and decays to 0 in float32: the shipped weights used this.
def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 5% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


# Not optim.make_optimizer, which builds its lr schedule into the optimizer: here the lr comes per step from the host.
@functools.lru_cache(maxsize=None)
def _tx(b2: float) -> optax.GradientTransformation:
    """The update rule of both phases: clip the global norm at 1, Adam, then -lr (the lr comes in per step
    from the host, so one compiled step serves the whole schedule)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=b2))


def _apply(params, opt_state, grads, lr, b2):
    updates, opt_state = _tx(b2).update(grads, opt_state, params)
    return jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates), opt_state


# ---------------------------------------------------------------------------------------------
# Phase 1: the VAE.

@functools.partial(jax.jit, static_argnames=("vae", "l1_weight", "kl_weight", "b2"), donate_argnums=(0, 1))
def _vae_step(params, opt_state, images_u8, key, lr, *, vae: vae_lib.AutoencoderKL, l1_weight: float,
              kl_weight: float, b2: float):
    x = vae_lib.to_unit_range(images_u8)

    def loss_fn(p):  # encode, not vae_lib.posterior: the KL term needs logvar itself
        mean, logvar = vae.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = vae.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode)
        mse, l1 = jnp.mean((rec - x) ** 2), jnp.mean(jnp.abs(rec - x))
        # SD's KL: summed over latent values, against a reconstruction loss summed over pixel values.
        kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar) / x.size
        return mse + l1_weight * l1 + kl_weight * kl, (mse, l1)

    (loss, (mse, l1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state = _apply(params, opt_state, grads, lr, b2)
    return params, opt_state, {"loss": loss, "mse": mse, "l1": l1}


def train_vae(images: np.ndarray, hp: HParams, steps: int, seed: int, log=print):
    """-> (module with scaling_factor unset, params). images: uint8 [N, 32, 32, 3]."""
    vae = vae_lib.vae_from_config({k: v for k, v in presets.TINY_SD_VAE.items() if v is not None})
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    params = jax.jit(vae.init)(key, jnp.zeros((1, 32, 32, 3), jnp.float32))["params"]
    lc = vae.latent_channels  # quant_conv's outputs are [mean, logvar]
    params["quant_conv"]["bias"] = params["quant_conv"]["bias"].at[lc:].set(hp.vae_logvar_init)
    opt_state = _tx(hp.vae_b2).init(params)
    batches = epoch_batches(len(images), hp.vae_batch, steps, np.random.default_rng([seed, 1]))
    warmup = min(hp.vae_warmup, max(1, steps // 4))
    crop_steps = int(round(steps * hp.vae_crop_frac)) if hp.vae_crop < images.shape[1] else 0
    f = 2 ** (len(vae.block_out_channels) - 1)  # crops on the latent grid
    offsets = np.random.default_rng([seed, 3]).integers(0, (images.shape[1] - hp.vae_crop) // f + 1,
                                                        size=(crop_steps, hp.vae_batch, 2)) * f
    t0 = time.perf_counter()
    for step in range(steps):
        lr = np.float32(lr_at(step, hp.vae_lr, warmup, steps))
        batch = images[batches[step]]
        if step < crop_steps:
            c = hp.vae_crop
            batch = np.stack([im[y:y + c, x:x + c] for im, (y, x) in zip(batch, offsets[step])])
        params, opt_state, m = _vae_step(params, opt_state, batch, jax.random.fold_in(key, step),
                                         lr, vae=vae, l1_weight=hp.vae_l1, kl_weight=hp.vae_kl, b2=hp.vae_b2)
        if step % 200 == 0 or step == steps - 1:
            log(f"  vae step {step:5d}  mse {float(m['mse']):.4f}  l1 {float(m['l1']):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - t0:.0f} s")
    return vae, params


_posterior = jax.jit(vae_lib.posterior, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("vae",))
def _decode(params, latents, *, vae):
    return vae.apply({"params": params}, latents, method=vae_lib.AutoencoderKL.decode)


def encode_all(vae, params, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (mean, std) of every image, float32 [N, 8, 8, 4] each (fixed batches: one compiled shape)."""
    n = len(images)
    pad = (-n) % batch
    padded = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
    out = [_posterior(vae, params, padded[i:i + batch]) for i in range(0, len(padded), batch)]
    mean = np.concatenate([np.asarray(m) for m, _ in out])[:n]
    std = np.concatenate([np.asarray(s) for _, s in out])[:n]
    return mean, std


def latent_scaling_factor(mean: np.ndarray, std: np.ndarray, seed: int) -> float:
    """1 / std of posterior samples (SD's 0.18215 is this for its VAE), to 4 significant digits."""
    eps = np.random.default_rng([seed, 2]).standard_normal(mean.shape).astype(np.float32)
    return float(f"{1.0 / float(np.std(mean + std * eps, dtype=np.float64)):.4g}")


# ---------------------------------------------------------------------------------------------
# Phase 2: the text encoder and the UNet.

@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "schedule", "train_text", "b2"),
                   donate_argnums=(0, 1, 2))
def _denoise_step(trainable, opt_state, ema, frozen, lat_mean, lat_std, ids, key, lr, ema_decay, scaling, *, unet,
                  text_encoder, schedule: diffusion.NoiseSchedule, train_text: bool, b2: float):
    k_lat, k_t, k_eps = jax.random.split(key, 3)
    x0 = scaling * (lat_mean + lat_std * jax.random.normal(k_lat, lat_mean.shape))
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = schedule.q_sample(x0, t, eps)

    def loss_fn(p):
        text_params = p["text"] if train_text else frozen["text"]
        context = text_encoder.apply({"params": text_params}, ids)
        pred = unet.apply({"params": p["unet"]}, x_t, t, context)
        return jnp.mean((pred - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    trainable, opt_state = _apply(trainable, opt_state, grads, lr, b2)
    # Not optim.ema_update: its e + (1 - d)(p - e) rounds differently, and the shipped weights used this form.
    ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, trainable)
    return trainable, opt_state, ema, loss


_ZERO_INIT = ("conv2", "proj_out", "conv_out")  # a resnet's last conv, a transformer's output, the UNet's output


def zero_init(unet_params):
    """Residual branches start as the identity and the UNet predicts 0: faster early training (ADM's
    zero_module). The checkpoint format does not care how the weights started."""
    def f(path, x):
        return jnp.zeros_like(x) if any(getattr(k, "key", None) in _ZERO_INIT for k in path) else x
    return jax.tree_util.tree_map_with_path(f, unet_params)


def build_text_and_unet(seed: int, token_init: float = 0.0):
    """Fresh modules and params; ``token_init`` > 0 redraws the token embeddings with that std."""
    text_encoder = clip.text_encoder_from_config(presets.TINY_SD_TEXT_ENCODER)
    unet = unet_lib.unet_from_config(presets.TINY_SD_UNET)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
    ids = jnp.zeros((1, text_encoder.config.max_position_embeddings), jnp.int32)
    text_params = jax.jit(text_encoder.init)(jax.random.fold_in(key, 0), ids)["params"]
    if token_init > 0:
        emb = text_params["text_model"]["embeddings"]["token_embedding"]
        emb["embedding"] = token_init * jax.random.normal(jax.random.fold_in(key, 2), emb["embedding"].shape)
    latents, t, context, _ = unet.dummy_inputs(side=presets.TINY_SD_UNET["sample_size"])
    unet_params = jax.jit(unet.init)(jax.random.fold_in(key, 1), latents, t, context)["params"]
    return text_encoder, text_params, unet, unet_params


def train_denoiser(lat_mean: np.ndarray, lat_std: np.ndarray, caption_ids: np.ndarray, empty_ids: np.ndarray,
                   scaling: float, schedule: diffusion.NoiseSchedule, hp: HParams, steps: int, seed: int, log=print):
    """-> (text_encoder, text_params, unet, unet_params), the EMA weights. caption_ids: int32 [N, L] per image."""
    text_encoder, text_params, unet, unet_params = build_text_and_unet(seed, hp.text_token_init)
    if hp.unet_zero_init:
        unet_params = zero_init(unet_params)
    trainable = {"unet": unet_params, **({"text": text_params} if hp.train_text_encoder else {})}
    frozen = {} if hp.train_text_encoder else {"text": text_params}
    opt_state = _tx(hp.unet_b2).init(trainable)
    ema = jax.tree_util.tree_map(jnp.copy, trainable)
    rng = np.random.default_rng([seed, 4])
    batches = epoch_batches(len(lat_mean), hp.unet_batch, steps, rng)
    drop = rng.random((steps, hp.unet_batch)) < hp.caption_dropout
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 5)
    warmup = min(hp.unet_warmup, max(1, steps // 4))
    decays = np.asarray(optim.ema_decay(np.arange(steps), hp.unet_ema))
    running, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = batches[step]
        ids = np.where(drop[step][:, None], empty_ids[None], caption_ids[idx])
        lr = np.float32(lr_at(step, hp.unet_lr, warmup, steps))
        decay = decays[step]
        trainable, opt_state, ema, loss = _denoise_step(
            trainable, opt_state, ema, frozen, lat_mean[idx], lat_std[idx], ids, jax.random.fold_in(key, step), lr,
            decay, np.float32(scaling), unet=unet, text_encoder=text_encoder, schedule=schedule,
            train_text=hp.train_text_encoder, b2=hp.unet_b2)
        running.append(loss)
        if step % 250 == 0 or step == steps - 1:
            log(f"  unet step {step:5d}  loss {float(np.mean(jax.device_get(running))):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - t0:.0f} s")
            running = []
    final = ema if hp.unet_ema > 0 else trainable
    text_params = final["text"] if hp.train_text_encoder else text_params
    return text_encoder, text_params, unet, final["unet"]


# ---------------------------------------------------------------------------------------------
# Measurement.

@functools.partial(jax.jit, static_argnames=("unet", "vae", "schedule", "num_steps", "guidance"))
def _generate(unet_params, vae_params, cond, uncond, x_T, scaling, *, unet, vae, schedule, num_steps: int,
              guidance: float):
    """DDIM with classifier-free guidance, decoded: images [B, 32, 32, 3] in about [-1, 1]."""
    eps_fn = lambda x, t, c: unet.apply({"params": unet_params}, x, t, c)
    z0 = diffusion.sample(eps_fn, x_T, schedule, sampler="ddim", num_steps=num_steps, guidance_scale=guidance,
                          cond=cond, uncond=uncond)
    return vae.apply({"params": vae_params}, z0 / scaling, method=vae_lib.AutoencoderKL.decode)


@functools.partial(jax.jit, static_argnames=("text_encoder",))
def _encode_text(params, ids, *, text_encoder):
    return text_encoder.apply({"params": params}, ids)


def generate(pipe: pipeline_lib.SDPipeline, prompts: Sequence[str], images_per_prompt: int, *, num_steps: int = 25,
             guidance: float = 3.0, seed: int = 0) -> np.ndarray:
    """uint8 [len(prompts) * images_per_prompt, H, W, 3], prompt-major; image j from fold_in(key(seed), j)."""
    schedule = diffusion.NoiseSchedule.from_config(pipe.scheduler_config)
    texts = [p for p in prompts for _ in range(images_per_prompt)]
    cond = _encode_text(pipe.text_encoder_params, tokenize(pipe.tokenizer, texts), text_encoder=pipe.text_encoder)
    uncond = jnp.broadcast_to(
        _encode_text(pipe.text_encoder_params, tokenize(pipe.tokenizer, [""]), text_encoder=pipe.text_encoder),
        cond.shape)
    side = pipe.unet.sample_size
    key = jax.random.PRNGKey(seed)
    x_T = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), (side, side, pipe.unet.in_channels)))(
        jnp.arange(len(texts)))
    images = _generate(pipe.unet_params, pipe.vae_params, cond, uncond, x_T, np.float32(pipe.vae.scaling_factor),
                       unet=pipe.unet, vae=pipe.vae, schedule=schedule, num_steps=num_steps, guidance=guidance)
    return np.clip(np.rint((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def clean_renders(prompts: Sequence[str], per_prompt: int, seed: int = 7) -> tuple[np.ndarray, list[str]]:
    """Flawless renders of each prompt (the reward's ceiling), uint8 [N * per_prompt, 32, 32, 3]."""
    captions = [p for p in prompts for _ in range(per_prompt)]
    images = np.stack([shapes.render(c, np.random.default_rng([seed, j])) for j, c in enumerate(captions)])
    return images, captions


def measure(pipe: pipeline_lib.SDPipeline, hp: HParams, seed: int = 0) -> dict:
    """The numbers MANIFEST.json records (see the module docstring), on shapes.heldout_prompts()."""
    prompts = shapes.heldout_prompts()
    k = hp.eval_images_per_prompt
    gen = generate(pipe, prompts, k, num_steps=hp.eval_steps, guidance=hp.eval_guidance, seed=seed)
    captions = [p for p in prompts for _ in range(k)]
    terms = shapes.reward_terms(gen, captions)
    rewards = shapes.reward_batch(gen, captions)
    # The same images against a derangement of the prompts: what an image that ignores its caption gets.
    shifted = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]
    shuffled = shapes.reward_batch(gen, [p for p in shifted for _ in range(k)])
    clean, clean_caps = clean_renders(prompts, k)
    mean, _ = encode_all(pipe.vae, pipe.vae_params, clean, batch=len(clean))
    recon = np.asarray(_decode(pipe.vae_params, mean, vae=pipe.vae))
    noise = np.random.default_rng([seed, 9]).integers(0, 256, clean.shape, dtype=np.uint8)
    r = lambda x: round(float(np.mean(x)), 4)
    return {
        "prompts": f"shapes.heldout_prompts() ({len(prompts)} held-out captions), {k} images each",
        "sampling": f"DDIM {hp.eval_steps} steps, CFG {hp.eval_guidance}, seed {seed}",
        "base_reward_mean": r(rewards),
        "base_reward_terms": {t: r(terms[t]) for t in ("background", "color", "count", "shape")},
        "base_reward_shuffled_captions": r(shuffled),
        "vae_recon_reward_mean": r(shapes.reward_batch(recon, clean_caps, value_range=(-1.0, 1.0))),
        "clean_render_reward_mean": r(shapes.reward_batch(clean, clean_caps)),
        "noise_image_reward_mean": r(shapes.reward_batch(noise, clean_caps)),
    }


# ---------------------------------------------------------------------------------------------
# Writing the folder.

def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` except MANIFEST.json, sorted."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = sha256_of(os.path.join(root, name))
    return dict(sorted(out.items()))


def write_folder(out: str, pipe: pipeline_lib.SDPipeline) -> None:
    """``save_pipeline`` into ``out`` (replaced whole), with tokenizer/ a verbatim copy of the shapes tokenizer."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "model_index.json")):
        raise ValueError(f"--out {out}: exists and is not a pipeline folder; refusing to replace it "
                         "(pick an empty or new folder)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny_sd-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the folder into the package
    try:
        pipeline_lib.save_pipeline(tmp, pipe)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for name in sorted(os.listdir(SHAPES_TOKENIZER_DIR)):
            shutil.copyfile(os.path.join(SHAPES_TOKENIZER_DIR, name), os.path.join(tmp, "tokenizer", name))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shown(path: str) -> str:
    """A path as MANIFEST.json records it: relative to the repository when inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, _REPO) if path.startswith(_REPO + os.sep) else path


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "diffusers", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# The command.

def run(out: str = DEFAULT_OUT, steps_scale: float = 1.0, seed: int = 0, data_dir: Optional[str] = None,
        hp: HParams = HParams(), evaluate: bool = True, max_images: Optional[int] = None, log=print) -> dict:
    """Trains both phases, writes ``out`` and its MANIFEST.json; returns the manifest.

    ``max_images`` trains on the first N images only (smoke runs and tests; the shipped model uses all).
    """
    if steps_scale <= 0:
        raise ValueError(f"--steps-scale={steps_scale}: must be > 0")
    vae_steps = max(1, int(round(hp.vae_steps * steps_scale)))
    unet_steps = max(1, int(round(hp.unet_steps * steps_scale)))
    seconds = {}
    t_start = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 1)
        t = now

    images, captions = load_base_images(data_dir, max_images)
    log(f"data: {len(images)} shapes/base images, {len(set(captions))} captions")
    lap("data")

    log(f"phase 1: VAE, {vae_steps} steps of {hp.vae_batch}")
    vae, vae_params = train_vae(images, hp, vae_steps, seed, log)
    lap("vae")
    lat_mean, lat_std = encode_all(vae, vae_params, images)
    scaling = latent_scaling_factor(lat_mean, lat_std, seed)
    vae = vae.clone(scaling_factor=scaling)
    log(f"latents {lat_mean.shape[1:]}, scaling_factor {scaling}")
    lap("encode")

    log(f"phase 2: text encoder {'+' if hp.train_text_encoder else '(frozen random) +'} UNet, "
        f"{unet_steps} steps of {hp.unet_batch}")
    tokenizer = load_tokenizer()
    unique = sorted(set(captions))
    table = tokenize(tokenizer, unique)
    caption_ids = table[np.searchsorted(np.asarray(unique), np.asarray(captions))]
    empty_ids = tokenize(tokenizer, [""])[0]
    schedule = diffusion.NoiseSchedule.from_config(presets.SD15_SCHEDULER)
    text_encoder, text_params, unet, unet_params = train_denoiser(
        lat_mean, lat_std, caption_ids, empty_ids, scaling, schedule, hp, unet_steps, seed, log)
    lap("unet")

    pipe = pipeline_lib.SDPipeline(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                                   dict(presets.SD15_SCHEDULER), folder=out)
    metrics = {}
    if evaluate:
        metrics = measure(pipe, hp, seed)
        log("measured: " + json.dumps(metrics, indent=1))
        lap("measure")
    write_folder(out, pipe)
    lap("write")
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    manifest = {
        "generator": "python -m jaxpref.world.train_base",
        "args": {"out": _shown(out), "steps_scale": steps_scale, "seed": seed,
                 "evaluate": evaluate, "max_images": max_images},
        "hparams": dataclasses.asdict(hp),
        "steps": {"vae": vae_steps, "unet": unet_steps},
        "data": {"dataset": "shapes/base", "split": "train", "images": int(len(images)),
                 "captions": len(unique)},
        "vae_scaling_factor": scaling,
        "metrics": metrics,
        "seconds": seconds,
        "machine": {"cpu_count": os.cpu_count(), "backend": jax.default_backend(), **_versions()},
        "files": folder_hashes(out),
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"wrote {out} in {seconds['total']} s: {seconds}")
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jaxpref.world.train_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (replaced whole); default: the shipped "
                   "jaxpref/assets/tiny_sd")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every training step count (0.01: a seconds-long smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="TFDS data dir for shapes/base (built on first use); "
                   "default $JAXPREF_DATA_DIR or $XDG_CACHE_HOME/jaxpref/tfds (~/.cache/jaxpref/tfds)")
    p.add_argument("--no-eval", action="store_true", help="skip the measurements (MANIFEST.json metrics empty)")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N images only (smoke runs)")
    a = p.parse_args(argv)
    return run(a.out, a.steps_scale, a.seed, a.data_dir, evaluate=not a.no_eval, max_images=a.max_images)


if __name__ == "__main__":
    from jaxpref import console
    console.run_argparse(main, "jaxpref.world.train_base")
