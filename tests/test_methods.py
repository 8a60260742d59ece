"""The method registry: a fourth objective is one class plus one registry entry, trained by the same step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import config_lib, objectives, step as step_lib, trainer
from jaxpref.methods import METHODS, Method
from jaxpref.methods.base import NOISE, draw
from jaxpref.models import load_pipeline
from tiny_sd import build_tiny_sd


class WinnerSFT(Method):
    """A toy objective written in the test: plain denoising of the preferred image (SFT on winners)."""

    def loss(self, params, frozen, micro, rng, method_state):
        text = self.captions(frozen, micro)
        x0 = self.latents(micro)[:, 0]
        t = self.timesteps(micro["keys"])
        noise = draw(micro["keys"], NOISE, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        err = objectives.denoising_error(self.eps(params, self.schedule.q_sample(x0, t, noise), t, text), noise)
        return jnp.mean(err), ({"winner_err": jnp.mean(err)}, method_state)


@pytest.mark.compiled_for_few_runs
def test_a_fourth_objective_needs_only_a_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "winner_sft", WinnerSFT)
    pipeline = load_pipeline(build_tiny_sd(str(tmp_path / "tiny_sd")))
    c = config_lib.base_config()
    c.objective = "winner_sft"
    c.dtype = c.reference_dtype = "float32"
    c.batch_size, c.prompt_dropout, c.data.resolution = 2, 0.0, 32
    c.optimizer.update(name="sgd", lr=1.0, grad_clip=0.0, weight_decay=0.0)
    run = trainer.build_run(config_lib.validate(c, check_paths=False), pipeline)
    assert isinstance(run.method, WinnerSFT)
    state = step_lib.init_train_state(pipeline.unet_params, run.optimizer, c, run.method)
    h, w, ch = run.latent_shape
    rng = np.random.default_rng(0)
    batch = {"input_ids": np.tile(run.null_ids, (2, 1)),
             "latent_mean": rng.standard_normal((2, 2, h, w, ch)).astype(np.float32),
             "latent_std": np.zeros((2, 2, h, w, ch), np.float32)}
    new_state, metrics = jax.jit(step_lib.make_train_step(c, run.method, run.optimizer))(
        state, batch, jax.random.PRNGKey(0), trainer.frozen_params(run))
    assert int(new_state.step) == 1 and float(metrics["update_skipped"]) == 0.0
    assert float(metrics["loss"]) == float(metrics["winner_err"]) > 0
    # SGD with lr 1: the params moved by exactly the gradient of the toy loss.
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                                jax.tree_util.tree_leaves(new_state.params)))
    assert moved > 0


def test_caption_dropout_is_per_pair_and_keyed():
    """Prompt dropout (the step's, one draw per pair from its own key): p = 1 empties every caption, p = 0
    none, p = 0.3 about 30% of 2,000 pairs, and the same keys drop the same pairs."""
    from jaxpref.methods.base import drop_captions, pair_keys

    ids = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (2000, 1))
    null = np.zeros(8, np.int32)
    keys = pair_keys(jax.random.PRNGKey(0), 2000)
    assert (np.asarray(drop_captions(ids, keys, 1.0, null)) == 0).all()
    assert (np.asarray(drop_captions(ids, keys, 0.0, null)) == np.asarray(ids)).all()
    dropped = np.asarray(drop_captions(ids, keys, 0.3, null))
    rows = (dropped == 0).all(axis=1)
    assert (rows | (dropped == np.asarray(ids)).all(axis=1)).all()   # whole captions, nothing in between
    assert abs(rows.mean() - 0.3) < 0.04, rows.mean()
    np.testing.assert_array_equal(dropped, np.asarray(drop_captions(ids, keys, 0.3, null)))


def test_smpo_refuses_scores_outside_its_reward_range():
    """SmPO maps rewards to preferences by [reward_min, reward_max] (PickScore's cosine range by default): scores
    built with PickScore scaled by exp(logit_scale) (~100x) would make every preference 0 or 1, and are refused
    when the data opens; scores in the range pass, and data without scores is not its concern."""
    import types

    from jaxpref.errors import ConfigError

    config = config_lib.load_config("smposd15")
    smpo = METHODS["smpo"]
    scores = lambda lo, hi: types.SimpleNamespace(name="pickapic_v2/default", reward_range=(lo, hi))  # noqa: E731
    smpo.check_data(config, scores(0.10, 0.30))
    smpo.check_data(config, types.SimpleNamespace(name="shapes", reward_range=None))
    with pytest.raises(ConfigError, match=r"config.smpo.reward_min=.*span \[10, 30\]"):
        smpo.check_data(config, scores(10.0, 30.0))
    config.smpo.update(reward_min=10.0, reward_max=30.0)
    smpo.check_data(config, scores(10.0, 30.0))
