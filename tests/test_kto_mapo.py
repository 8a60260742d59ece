"""Diffusion-KTO and MaPO (docs/methods.md §7, §8): each loss against a float64 numpy transcription of its
released training script's loss code, the properties their papers state, the reference MaPO does not keep,
and one short CLI run each."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helpers as th
from jaxpref import config_lib, objectives, trainer
from jaxpref.errors import ConfigError
from jaxpref.methods.base import pair_keys
from jaxpref.models import load_pipeline

T = 1000  # the SD schedules' training timesteps: MaPO multiplies its margin by it


def _sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-x))


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def _reference_kto(model_losses, ref_loss, labels, beta, lambda_d, lambda_u, per_sample=False, clamp=True):
    """jacklishufan/diffusion-kto, train_kto_sd_v1.5.py, its defaults (--loss kto --halo sigmoid
    --bce_offset none), in float64: the reference point is the batch mean of g, clamped at 0, detached.
    The wrong estimators: ``per_sample``, each image's own g clamped; ``clamp=False``, the mean unclamped."""
    g = (-model_losses) - (-ref_loss)
    if per_sample:
        kl = np.maximum(g, 0.0)
    else:
        kl = max(g.mean(), 0.0) if clamp else g.mean()
    g = g - kl
    label_sgn = 2 * labels - 1
    h = _sigmoid64(label_sgn * beta * g)
    w_y = lambda_d * labels + lambda_u * (1 - labels)
    return np.mean(w_y * (1 - h))


def _reference_mapo(model_losses, beta, snr_value, timesteps, winner_term=True):
    """mapo-t2i/mapo, utils.py: compute_loss, in float64 (winners first, then losers). ``winner_term=False``:
    the wrong loss, the margin alone."""
    model_losses_w, model_losses_l = np.split(model_losses, 2)
    log_odds = (snr_value * model_losses_w) / (np.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l) / (np.exp(snr_value * model_losses_l) - 1)
    ratio_losses = beta * _log_sigmoid64(log_odds * timesteps)
    return (model_losses_w.mean() if winner_term else 0.0) - ratio_losses.mean()


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def _kto_inputs(seed, policy_better: bool, n=48):
    """Per-image errors near SD's (0.05-0.3) whose log-ratios are O(1/β); ``policy_better`` puts the batch mean
    of g = ref_err - err above 0 (the reference point is that mean) or below (it clips to 0)."""
    rng = np.random.default_rng(seed)
    ref_err = rng.uniform(0.05, 0.3, n)
    shift = 5e-4 if policy_better else -5e-4
    err = ref_err - shift + 1e-3 * rng.standard_normal(n)
    labels = (rng.uniform(size=n) < 0.6).astype(np.float64)  # unequal counts: the mean is over all images
    return err, ref_err, labels


@pytest.mark.parametrize("policy_better", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_matches_the_released_loss_and_its_batch_reference_point(seed, policy_better):
    err, ref_err, labels = _kto_inputs(seed, policy_better)
    beta, lam_d, lam_u = 1000.0, 1.3, 0.7
    expected = _reference_kto(err, ref_err, labels, beta, lam_d, lam_u)
    with jax.enable_x64(True):
        loss, metrics = objectives.kto_loss(jnp.asarray(err), jnp.asarray(ref_err), jnp.asarray(labels > 0), beta,
                                            lam_d, lam_u)
    assert _rel(loss, expected) <= 1e-6, (float(loss), expected)
    assert float(metrics["reference_point"]) == pytest.approx(max(np.mean(ref_err - err), 0.0), rel=1e-9, abs=1e-15)
    loss32, _ = objectives.kto_loss(*(jnp.asarray(x, jnp.float32) for x in (err, ref_err)), jnp.asarray(labels > 0),
                                    beta, lam_d, lam_u)
    assert _rel(loss32, expected) <= 1e-5  # what training computes, in fp32
    # The estimator matters: each image's own clamped g, or no clamp, gives another loss.
    per_sample = _reference_kto(err, ref_err, labels, beta, lam_d, lam_u, per_sample=True)
    assert _rel(per_sample, expected) > 1e-2
    if not policy_better:   # the mean of g is negative here: the clamp sets z to 0
        assert _rel(_reference_kto(err, ref_err, labels, beta, lam_d, lam_u, clamp=False), expected) > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapo_matches_the_released_loss_with_its_winner_term(seed):
    rng = np.random.default_rng(seed)
    errors = rng.uniform(0.05, 0.3, 64)
    errors[32:] = errors[:32] + 4e-3 * rng.standard_normal(32)  # margins T·Δscore of order 1
    beta, snr = 0.1, 0.5
    expected = _reference_mapo(errors, beta, snr, T)
    with jax.enable_x64(True):
        loss, metrics = objectives.mapo_loss(jnp.asarray(errors[:32]), jnp.asarray(errors[32:]), beta, snr, T)
    assert _rel(loss, expected) <= 1e-6, (float(loss), expected)
    assert float(metrics["err_w"]) == pytest.approx(errors[:32].mean(), rel=1e-12)
    loss32, _ = objectives.mapo_loss(jnp.asarray(errors[:32], jnp.float32), jnp.asarray(errors[32:], jnp.float32),
                                     beta, snr, T)
    assert _rel(loss32, expected) <= 5e-5  # fp32: T = 1000 scales the score's rounding
    assert _rel(_reference_mapo(errors, beta, snr, T, winner_term=False), expected) > 0.1


def test_mapo_score_is_finite_at_zero_error_with_its_limit():
    score = objectives.mapo_score(jnp.asarray([0.0, 1e-8, 0.2], jnp.float32), 0.5)
    np.testing.assert_allclose(np.asarray(score), [1.0, 1.0, 0.1 / np.expm1(0.1)], rtol=1e-6)
    grad = jax.grad(lambda e: objectives.mapo_score(e, 0.5).sum())(jnp.asarray([0.0, 0.2], jnp.float32))
    assert np.isfinite(np.asarray(grad)).all()


def test_kto_gradient_at_policy_equal_reference_lowers_desirable_errors_and_raises_undesirable():
    """At θ = ref every g is 0, so z = 0 and σ'(0) = 1/4: d loss / d err_i = +λ_D β / (4N) for a desirable
    image (descent lowers its error: raises its likelihood) and −λ_U β / (4N) for an undesirable one. The
    reference point carries no gradient (a z differentiated through the batch mean would add a shared term)."""
    _, ref_err, labels = _kto_inputs(3, True)
    desirable = jnp.asarray(labels > 0)
    beta, lam_d, lam_u, n = 1000.0, 1.5, 0.5, len(ref_err)
    ref = jnp.asarray(ref_err, jnp.float32)
    loss_fn = lambda e: objectives.kto_loss(e, ref, desirable, beta, lam_d, lam_u)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(loss_fn)(ref)
    weights = np.where(labels > 0, lam_d, lam_u)
    assert float(loss) == pytest.approx(weights.mean() / 2, rel=1e-6)
    expected = np.where(labels > 0, lam_d, -lam_u) * beta / (4 * n)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)


def _toy_mapo_step(err_w_scale, err_l_scale, beta=0.1, lr=1e-2):
    """One SGD step of MaPO on a toy denoiser ε̂ = w ⊙ x (w the params), one pair with the winner's input
    fixed and the loser's chosen so its error is ``err_l_scale``: the size of the step."""
    rng = np.random.default_rng(0)
    shape = (1, 4, 4, 2)
    x_w, x_l, eps = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    w0 = jnp.ones(shape[1:], jnp.float32)
    # Targets placed so that at w0 the errors are the requested ones: target = w0 ⊙ x + scale · unit noise.
    unit = eps / jnp.sqrt(jnp.mean(jnp.square(eps)))
    t_w, t_l = w0 * x_w + np.sqrt(err_w_scale) * unit, w0 * x_l + np.sqrt(err_l_scale) * unit

    def loss(w):
        e_w = objectives.denoising_error(w * x_w, t_w)
        e_l = objectives.denoising_error(w * x_l, t_l)
        return objectives.mapo_loss(e_w, e_l, beta, 0.5, T)[0]

    grad = jax.grad(loss)(w0)
    return float(jnp.linalg.norm(lr * grad))


def test_mapo_moves_the_params_less_on_a_pair_it_already_ranks_right():
    """The same winner (error 0.1) against a loser denoised far worse (error 1.0: T·Δscore ≈ +200, σ saturated)
    or far better (0.01: the reversed margin): the step on the second is many times larger. Without the margin
    term both steps would be equal (the winner's term is the same)."""
    right = _toy_mapo_step(0.1, 1.0)
    reversed_margin = _toy_mapo_step(0.1, 0.01)
    sft_only = _toy_mapo_step(0.1, 1.0, beta=0.0)
    assert right == pytest.approx(sft_only, rel=1e-3)   # a saturated margin leaves the winner's term alone
    assert reversed_margin > 10 * right


def test_flops_per_update_count_the_reference_forward_for_kto_only():
    """B pairs: KTO runs the policy forward+backward and the reference forward on 2B images (as DPO); MaPO the
    policy's alone."""
    from jaxpref import flops

    pairs, fwd, fwdbwd = 16, 0.8e12, 2.36e12
    assert flops.model_flops("kto step", pairs, fwd, fwdbwd) == pytest.approx(2 * pairs * (fwdbwd + fwd))
    assert flops.model_flops("mapo step", pairs, fwd, fwdbwd) == pytest.approx(2 * pairs * fwdbwd)


@pytest.fixture(scope="module")
def tiny_pipeline(world):
    return load_pipeline(world[0])


def _tiny_config(objective, **overrides):
    c = config_lib.load_config(f"tiny:{objective}")
    c.dtype = c.reference_dtype = "float32"
    c.batch_size, c.prompt_dropout = 4, 0.25
    return config_lib.apply_overrides(c, overrides, source="test")


def test_mapo_keeps_no_reference_and_kto_does(tiny_pipeline):
    """The frozen params a run puts on the devices: MaPO's hold the text encoder only (no second UNet), KTO's
    the reference too; with LoRA MaPO keeps the frozen base, which the adapters apply to."""
    for objective, keys in (("mapo", {"text"}), ("kto", {"ref", "text"})):
        run = trainer.build_run(config_lib.validate(_tiny_config(objective), check_paths=False), tiny_pipeline)
        assert set(trainer.frozen_params(run)) == keys, objective
    lora = _tiny_config("mapo", **{"lora.enabled": True})
    run = trainer.build_run(config_lib.validate(lora, check_paths=False), tiny_pipeline)
    assert set(trainer.frozen_params(run)) == {"ref", "text"}


@pytest.mark.compiled_for_few_runs
def test_kto_step_at_policy_equal_reference_favours_the_chosen_images(tiny_pipeline):
    """Through the method on the tiny UNet, θ = ref: the loss is 1/2 (λ = 1) with z ≈ 0, and a small descent
    step along its gradient makes the chosen images' log-ratios rise against the rejected ones' (to first order
    it changes mean g_D − mean g_U by 8 · lr · ‖∇loss‖² / β > 0 whatever the images' gradients; chosen and
    rejected swapped in the method would flip that sign)."""
    config = config_lib.validate(_tiny_config("kto"), check_paths=False)
    run = trainer.build_run(config, tiny_pipeline)
    frozen = trainer.frozen_params(run)
    h, w, ch = run.latent_shape
    rng = np.random.default_rng(0)
    micro = {"input_ids": np.tile(run.null_ids, (4, 1)),
             "latent_mean": rng.standard_normal((4, 2, h, w, ch)).astype(np.float32),
             "latent_std": np.full((4, 2, h, w, ch), 0.1, np.float32),
             "keys": pair_keys(jax.random.PRNGKey(1), 4)}
    key = jax.random.PRNGKey(2)
    loss_fn = jax.jit(jax.value_and_grad(lambda p: run.method.loss(p, frozen, micro, key, None), has_aux=True))
    params = tiny_pipeline.unet_params
    (loss, (metrics, _)), grad = loss_fn(params)
    # θ = ref up to fp32 rounding: the policy's forward (under the gradient) and the reference's are separate UNet
    # calls whose per-image errors differ by ~1e-8, which β (250 here) turns into a few 1e-6 on the loss.
    assert float(loss) == pytest.approx(0.5, abs=1e-4)
    assert float(metrics["reference_point"]) < 1e-6
    # The step on the host (op by op on the device, every leaf's shape would compile its own ops).
    lr = np.float32(1e-3 / np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                                       for g in jax.tree_util.tree_leaves(grad))))
    stepped = jax.tree_util.tree_map(lambda p, g: np.asarray(p) - lr * np.asarray(g), params, grad)
    (new_loss, (new, _)), _ = loss_fn(stepped)
    assert float(new_loss) < float(loss)
    before = float(metrics["desirable_gap"]) - float(metrics["undesirable_gap"])
    after = float(new["desirable_gap"]) - float(new["undesirable_gap"])
    assert after > before + 1e-5, (before, after)
    # Each group on its own moves the right way too on these draws (measured: +4e-4 and -1.2e-3).
    assert float(new["desirable_gap"]) > 1e-5 and float(new["undesirable_gap"]) < -1e-5


def _by_hand(run, keys, latents, input_ids, params_list):
    """Each image's denoising error recomputed outside the method, for each params in ``params_list``: image i
    draws t and ε from keys[i] (fold_in tags 2 and 3, as every method's per-pair draws), x_t from the
    scheduler's own ᾱ (diffusers), x0 = scale · the latent mean (no posterior sample), captions not dropped."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_pretrained(run.config.model_path, subfolder="scheduler").alphas_cumprod.numpy()
    t = np.asarray([int(jax.random.randint(jax.random.fold_in(k, 2), (), 0, T)) for k in keys])
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 3), run.latent_shape)) for k in keys])
    a = alphas[t][:, None, None, None]
    x_t = np.sqrt(a) * run.pipeline.vae.scaling_factor * latents + np.sqrt(1 - a) * eps
    text = jax.jit(run.pipeline.text_encoder.apply)({"params": run.pipeline.text_encoder_params}, input_ids)
    unet = jax.jit(run.pipeline.unet.apply)
    errors = [np.mean((np.asarray(unet({"params": p}, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), text),
                                  np.float64) - eps) ** 2, axis=(1, 2, 3)) for p in params_list]
    return t, errors


def _wiring_case(objective, world, tiny_pipeline):
    """A run of configs/tiny.py:<objective> in fp32 on 4 distinct pairs (winner first), with no prompt dropout or
    posterior sample (so the by-hand errors need neither), and its method's loss as one compiled call."""
    from jaxpref.data.tokenizer import tokenize

    config = _tiny_config(objective, prompt_dropout=0.0, sample_posterior=False, model_path=world[0])
    run = trainer.build_run(config_lib.validate(config, check_paths=False), tiny_pipeline)
    h, w, ch = run.latent_shape
    rng = np.random.default_rng(5)
    micro = {"input_ids": tokenize(run.pipeline.tokenizer, ["a red circle", "blue", "the square", "a cat"]),
             "latent_mean": (rng.standard_normal((4, 2, h, w, ch)) * 4.0).astype(np.float32),
             "latent_std": np.full((4, 2, h, w, ch), 0.1, np.float32),
             "keys": pair_keys(jax.random.PRNGKey(1), 4)}
    frozen = trainer.frozen_params(run)
    return run, micro, jax.jit(lambda p, f: run.method.loss(p, f, micro, jax.random.PRNGKey(2), None)[0]), frozen


@pytest.mark.compiled_for_few_runs
def test_mapo_loss_wires_winner_and_loser_with_one_t_and_noise_per_pair(world, tiny_pipeline):
    """MaPO's loss through the method equals the released loss on errors recomputed by hand, the winner's image
    first and both images of a pair noised with the pair's one t and ε (the released script repeats them over
    the pair). Swapping winner and loser, or a t or ε per image, gives another loss (asserted)."""
    run, micro, loss_fn, frozen = _wiring_case("mapo", world, tiny_pipeline)
    keys = list(micro["keys"])
    params = run.pipeline.unet_params
    latents = np.concatenate([micro["latent_mean"][:, 0], micro["latent_mean"][:, 1]])
    ids = np.concatenate([micro["input_ids"]] * 2)
    _, (err,) = _by_hand(run, keys + keys, latents, ids, [params])
    beta, snr = run.config.mapo.beta, run.config.mapo.snr_value
    expected = _reference_mapo(err, beta, snr, T)
    got = float(loss_fn(params, frozen))
    assert got == pytest.approx(expected, rel=1e-5), (got, expected)
    swapped = _reference_mapo(np.concatenate([err[4:], err[:4]]), beta, snr, T)
    second = [jax.random.fold_in(k, 6) for k in keys]   # another key for each loser
    _, (per_image,) = _by_hand(run, keys + second, latents, ids, [params])
    for wrong in (swapped, _reference_mapo(per_image, beta, snr, T)):
        assert _rel(wrong, expected) > 1e-3, (wrong, expected)


@pytest.mark.compiled_for_few_runs
def test_kto_loss_gives_each_image_its_own_t_and_noise(world, tiny_pipeline):
    """KTO's loss through the method, policy ≠ reference, equals the released loss on errors recomputed by hand
    with each image drawing its own t and ε (chosen: its pair's key; rejected: a key of its own), as the
    released script trains single images. The pair's one t and ε for both images gives another loss (asserted),
    and the recomputed rejected images' t differ from their chosen's."""
    run, micro, loss_fn, frozen = _wiring_case("kto", world, tiny_pipeline)
    keys = list(micro["keys"])
    rng = np.random.default_rng(6)
    policy = jax.tree_util.tree_map(  # a policy 1% away from the reference, weight by weight
        lambda p: np.asarray(p) * (1 + 0.01 * rng.standard_normal(p.shape)).astype(np.float32), frozen["ref"])
    latents = np.concatenate([micro["latent_mean"][:, 0], micro["latent_mean"][:, 1]])
    ids = np.concatenate([micro["input_ids"]] * 2)
    labels = np.repeat([1.0, 0.0], 4)
    k = run.config.kto
    second = [jax.random.fold_in(key, 6) for key in keys]
    t, (err, ref_err) = _by_hand(run, keys + second, latents, ids, [policy, frozen["ref"]])
    assert (t[:4] != t[4:]).any(), t
    expected = _reference_kto(err, ref_err, labels, k.beta, k.lambda_desirable, k.lambda_undesirable)
    got = float(loss_fn(policy, frozen))
    assert got == pytest.approx(expected, abs=1e-4), (got, expected)
    _, (shared, shared_ref) = _by_hand(run, keys + keys, latents, ids, [policy, frozen["ref"]])
    wrong = _reference_kto(shared, shared_ref, labels, k.beta, k.lambda_desirable, k.lambda_undesirable)
    assert abs(wrong - expected) > 1e-2, (wrong, expected)


@pytest.mark.parametrize("key, value, match", [
    ("kto.beta", 0.0, "config.kto.beta=0.0"),
    ("kto.lambda_undesirable", -1.0, "config.kto.lambda_undesirable=-1.0"),
    ("mapo.snr_value", 0.0, "config.mapo.snr_value=0.0"),
    ("mapo.beta", -0.1, "config.mapo.beta=-0.1"),
    ("reference_path", "/some/unet", "reference-free"),
])
def test_bad_values_are_named_before_anything_loads(key, value, match):
    config = _tiny_config(key.split(".")[0] if "." in key else "mapo", **{key: value})
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config, check_paths=False)


@pytest.mark.parametrize("objective, metric", [("kto", "reference_point"), ("mapo", "err_w")])
def test_a_short_run_through_the_cli(objective, metric, world, tmp_path):
    """``python -m jaxpref.train`` with configs/tiny.py:<objective> on the tests' tiny random pipeline (its
    smaller UNet compiles in 2/3 of the shipped one's time), 2 updates (compiled at LLVM level 0, as conftest's
    ``compiled_for_few_runs``)."""
    config_file = tmp_path / "config.py"
    config_file.write_text(f"""import sys
sys.path.insert(0, {th.TESTS!r})
import train_helpers
from jaxpref import config_lib


def get_config():
    train_helpers.compile_as_the_parent_asked()
    return config_lib.load_config("tiny:{objective}")
""")
    workdir = tmp_path / objective
    args = [f"--config={config_file}", f"--workdir={workdir}", "--config.total_steps=2", "--config.batch_size=4",
            "--config.optimizer.warmup_steps=0", "--config.log.every=1", "--config.checkpoint.every=0",
            "--config.eval.final=False", f"--config.data.data_dir={world[1]}", f"--config.model_path={world[0]}"]
    out = subprocess.run([sys.executable, "-m", "jaxpref.train", *args], cwd=th.REPO,
                         env=th.subprocess_env(llvm_level_0=True), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2], rows
    assert all(np.isfinite(r["train/loss"]) and f"train/{metric}" in r for r in losses.values())
    assert losses[2]["train/update_skipped"] == 0.0
    if objective == "kto":   # the first update starts at θ = ref: loss 1/2 with λ = 1
        assert losses[1]["train/loss"] == pytest.approx(0.5, abs=1e-4)
