"""The losses against float64 numpy transcriptions of docs/methods.md §1-3, and the paper's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

from jaxpref import objectives  # noqa: E402


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def _errors(seed, n=64, scale=1e-3):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.05, 0.3, size=(4, n))
    return base + scale * rng.standard_normal((4, n))


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_matches_float64_formula(seed):
    ew, el, rw, rl = _errors(seed)
    beta = 5000.0
    inside = -0.5 * beta * ((ew - el) - (rw - rl))
    expected = -np.mean(_log_sigmoid64(inside))
    loss, metrics = objectives.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (ew, el, rw, rl)), beta)
    assert _rel(loss, expected) <= 1e-5, (float(loss), expected)
    assert float(metrics["implicit_acc"]) == pytest.approx(np.mean(inside > 0), abs=1.5 / len(ew))


def test_dpo_at_init_is_log2_and_gradient_is_quarter_beta_gap():
    ew, el, _, _ = _errors(3)
    beta = 5000.0
    loss, _ = objectives.dpo_loss(ew, el, ew, el, beta)
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)  # float32 log σ(0)
    # d loss / d err_w at policy = reference: -log σ(x) has slope -1/2 at 0, x = -β/2 Δθ, mean over B.
    grad_w = jax.grad(lambda e: objectives.dpo_loss(e, jnp.asarray(el), jnp.asarray(ew), jnp.asarray(el), beta)[0])(
        jnp.asarray(ew))
    np.testing.assert_allclose(np.asarray(grad_w), 0.25 * beta / len(ew), rtol=1e-6)


def test_smpo_preference_and_loss_match_float64():
    rng = np.random.default_rng(7)
    ew, el, rw_, rl_ = _errors(7)
    rew_w = rng.uniform(0.15, 0.28, len(ew))
    rew_l = rng.uniform(0.12, 0.25, len(ew))
    lo, hi = objectives.PICKSCORE_MIN, objectives.PICKSCORE_MAX
    r1, r2 = (rew_w - lo) / (hi - lo), (rew_l - lo) / (hi - lo)
    p = np.exp(r1) / (np.exp(r1) + np.exp(r2))
    np.testing.assert_allclose(np.asarray(objectives.smpo_preference(rew_w, rew_l)), p, rtol=1e-6)
    beta, gamma = 2000.0, 10.0
    inside = -0.5 * beta * gamma * (2 * p - 1) * ((ew - el) - (rw_ - rl_))
    expected = -np.mean(_log_sigmoid64(inside))
    loss, m = objectives.smpo_loss(*(jnp.asarray(x, jnp.float32) for x in (ew, el, rw_, rl_)), beta,
                                   jnp.asarray(p, jnp.float32), gamma)
    assert _rel(loss, expected) <= 1e-5
    assert float(m["smoothing"]) == pytest.approx(np.mean(gamma * (2 * p - 1)), rel=1e-5)


def test_smpo_with_unit_smoothing_is_dpo():
    ew, el, rw, rl = (jnp.asarray(x, jnp.float32) for x in _errors(11))
    gamma = 4.0
    prob = jnp.full_like(ew, 0.5 + 0.5 / gamma)  # γ(2p−1) = 1
    smpo, _ = objectives.smpo_loss(ew, el, rw, rl, 2000.0, prob, gamma)
    dpo, _ = objectives.dpo_loss(ew, el, rw, rl, 2000.0)
    assert float(smpo) == pytest.approx(float(dpo), rel=1e-6)


def test_smpo_equal_rewards_give_log2_and_zero_gradient():
    ew, el, rw, rl = (jnp.asarray(x, jnp.float32) for x in _errors(13))
    reward = jnp.full_like(ew, 0.2)
    prob = objectives.smpo_preference(reward, reward)
    loss_fn = lambda e_w, e_l: objectives.smpo_loss(e_w, e_l, rw, rl, 2000.0, prob, 10.0)[0]
    assert float(loss_fn(ew, el)) == pytest.approx(np.log(2.0), rel=1e-6)
    gw, gl = jax.grad(loss_fn, argnums=(0, 1))(ew, el)
    assert float(jnp.max(jnp.abs(gw))) == 0.0 and float(jnp.max(jnp.abs(gl))) == 0.0


def test_dro_matches_float64_hinge():
    ee, er, ne, nr = _errors(17)
    m = 0.001
    expected = np.mean(np.maximum(0.0, (ee - er) - (ne - nr) + m))
    loss, metrics = objectives.dro_loss(*(jnp.asarray(x, jnp.float32) for x in (ee, er, ne, nr)), m)
    assert _rel(loss, expected) <= 1e-5
    assert float(metrics["active_hinge"]) == pytest.approx(np.mean((ee - er) - (ne - nr) + m > 0))


def test_dro_inactive_hinge_gives_zero_gradient():
    ee, er, ne, nr = (jnp.asarray(x, jnp.float32) for x in _errors(19))
    # Expert error far below the reference, negative error far above: every hinge is inactive.
    ee = er - 0.1
    ne = nr + 0.1
    loss_fn = lambda a, b: objectives.dro_loss(a, er, b, nr, 0.001)[0]
    assert float(loss_fn(ee, ne)) == 0.0
    ga, gb = jax.grad(loss_fn, argnums=(0, 1))(ee, ne)
    assert float(jnp.max(jnp.abs(ga))) == 0.0 and float(jnp.max(jnp.abs(gb))) == 0.0
    # And active hinges push the expert error down, the negative error up, each by 1/B.
    ga, gb = jax.grad(loss_fn, argnums=(0, 1))(er, nr)
    np.testing.assert_allclose(np.asarray(ga), 1.0 / ee.shape[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), -1.0 / ee.shape[0], rtol=1e-6)


def test_denoising_error_is_per_sample_mse():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 4, 2))
    b = rng.standard_normal((3, 4, 4, 2))
    np.testing.assert_allclose(np.asarray(objectives.denoising_error(a, b)), ((a - b) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-5)
