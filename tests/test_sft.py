"""SFT (``config.objective="sft"``): one step on the embedded model lowers the denoising error of the
preferred images, measured by a plain float64 MSE written here; the loser never enters; and the objective
is one file plus one registry line."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpref
from jaxpref import config_lib, step as step_lib, trainer
from jaxpref.data.tokenizer import tokenize
from jaxpref.methods import METHODS
from jaxpref.models import load_pipeline, resolve_model_path
from jaxpref.models.pipeline import EMBEDDED_TINY
import train_helpers as th

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]
GRID_T = np.linspace(20, 980, 8).astype(np.int32)   # the fixed noise levels every image is measured at


def alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000):
    """ᾱ_t of the "scaled_linear" schedule (the embedded model's scheduler config) in float64."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def denoising_mse(unet_apply, params, emb, x0, t, eps) -> np.ndarray:
    """Per-sample mean of (ε_θ(√ᾱ x0 + √(1−ᾱ) ε, t, c) − ε)², noising and error in float64 on the host;
    unet_apply: the UNet's (jitted) ``apply``."""
    a = alphas_cumprod()[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1.0 - a) * eps
    pred = np.asarray(unet_apply({"params": params}, jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                                 jnp.asarray(emb)), np.float64)
    return np.mean((pred - eps) ** 2, axis=(1, 2, 3))


@pytest.mark.compiled_for_few_runs
def test_one_sft_step_lowers_the_preferred_images_denoising_error_and_ignores_the_losers():
    pipeline = load_pipeline(resolve_model_path(EMBEDDED_TINY))
    c = config_lib.base_config()
    c.objective = "sft"
    c.dtype = c.reference_dtype = "float32"
    c.batch_size, c.prompt_dropout, c.sample_posterior, c.data.resolution = 4, 0.0, False, 32
    c.optimizer.update(name="sgd", lr=1e-2, grad_clip=0.0, weight_decay=0.0, warmup_steps=0)
    run = trainer.build_run(config_lib.validate(c, check_paths=False), pipeline)
    h, w, ch = run.latent_shape
    rng = np.random.default_rng(0)
    winners, losers = (rng.standard_normal((4, h, w, ch)).astype(np.float32) for _ in range(2))
    ids = tokenize(pipeline.tokenizer, CAPTIONS)

    def batch(losers):
        return {"input_ids": ids, "latent_mean": np.stack([winners, losers], axis=1),
                "latent_std": np.zeros((4, 2, h, w, ch), np.float32)}

    state = step_lib.init_train_state(pipeline.unet_params, run.optimizer, c, run.method)
    train_step = jax.jit(step_lib.make_train_step(c, run.method, run.optimizer))
    frozen = trainer.frozen_params(run)
    key = jax.random.PRNGKey(0)
    after, metrics = train_step(state, batch(losers), key, frozen)
    assert float(metrics["update_skipped"]) == 0.0 and float(metrics["loss"]) > 0

    # The same t and ε before and after: every preferred image at GRID_T, one fixed ε per (image, t).
    # One compiled forward each (op by op, the UNet's ops would each compile on their own).
    emb = np.asarray(jax.jit(pipeline.text_encoder.apply)({"params": pipeline.text_encoder_params}, ids))
    unet_apply = jax.jit(pipeline.unet.apply)
    x0 = np.repeat(pipeline.vae.scaling_factor * winners.astype(np.float64), len(GRID_T), axis=0)
    t = np.tile(GRID_T, 4)
    eps = np.random.default_rng(1).standard_normal(x0.shape)
    emb = np.repeat(emb, len(GRID_T), axis=0)
    before = denoising_mse(unet_apply, state.params, emb, x0, t, eps).mean()
    trained = denoising_mse(unet_apply, after.params, emb, x0, t, eps).mean()
    assert trained < 0.98 * before, (before, trained)

    # The loss reads the preferred image only: other losers, the same update to the last bit.
    other, _ = train_step(state, batch(-3.0 * losers), key, frozen)
    assert th.tree_max_abs_diff(after.params, other.params) == 0.0


def _names_sft(tree: ast.AST) -> list[str]:
    """Where a module's code names the SFT objective: the string "sft", the names sft/SFT, an import of it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "sft":
            found.append(f"line {node.lineno}: the string 'sft'")
        elif isinstance(node, ast.Name) and node.id in ("sft", "SFT"):
            found.append(f"line {node.lineno}: the name {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in ("sft", "SFT"):
            found.append(f"line {node.lineno}: the attribute .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [getattr(node, "module", None) or ""] + [alias.name for alias in node.names]
            if any(m.split(".")[-1] == "sft" for m in modules):
                found.append(f"line {node.lineno}: an import of the sft module")
    return found


def test_sft_is_one_file_plus_one_registry_line():
    """The package's promise (jaxpref/methods/__init__.py): the objective lives in methods/sft.py, the
    registry names it, and no other module (the config schema, the step, the feed, the loop) does."""
    package = pathlib.Path(jaxpref.__file__).parent
    sft_class = METHODS["sft"]
    assert sft_class.__module__ == "jaxpref.methods.sft"
    init = package / "methods" / "__init__.py"
    registry = [line for line in init.read_text().splitlines() if "SFT" in line or "sft" in line]
    assert len(registry) == 2 and registry[0] == "from jaxpref.methods.sft import SFT", registry
    assert registry[1].startswith("METHODS") and '"sft": SFT' in registry[1], registry
    others = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel in ("methods/sft.py", "methods/__init__.py"):
            continue
        found = _names_sft(ast.parse(path.read_text(), filename=rel))
        if found:
            others[rel] = found
    assert not others, others
    # The schema needs nothing of it: the base config with objective "sft" validates as it is.
    c = config_lib.base_config()
    c.objective = "sft"
    config_lib.validate(c, check_paths=False)
    assert sft_class.uses_reference is False
