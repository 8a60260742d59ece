"""Checkpoints of a training workdir: the policy params they hold equal the exported UNet, another
architecture's shapes fail with the tensor's name, and the loader positions they hold are per process.

Uses the in-process 1-device reference run shared with test_train.py (one compile per session).
"""
import base64
import json

import jax
import numpy as np
import pytest

import train_helpers as th
from jaxpref import checkpoint as checkpoint_lib, optim, sharding, step as step_lib, train as train_lib, trainer
from jaxpref.methods import get_method
from jaxpref.models import load_unet, unet as unet_lib, weights


def test_load_policy_params_equals_the_exported_unet(reference):
    workdir, _ = reference
    params = checkpoint_lib.load_policy_params(workdir)
    module, exported = load_unet(f"{workdir}/export/unet")
    assert th.tree_max_abs_diff(params, exported) == 0.0
    assert checkpoint_lib.load_policy_params(workdir, unet_lib.unet_param_shapes(module)) is not None
    earlier = checkpoint_lib.load_policy_params(workdir, step=3)
    assert th.tree_max_abs_diff(earlier, params) > 0  # step=3 is another checkpoint, and training moved


@pytest.fixture(scope="module")
def other_architecture(world):
    """Param shapes of a UNet like the tiny one but with wider second blocks (16 -> 32 channels)."""
    config = weights.read_config(f"{world[0]}/unet")
    return unet_lib.unet_param_shapes({**config, "block_out_channels": [8, 32]})


def test_load_policy_params_of_another_architecture_names_the_tensor(reference, other_architecture):
    with pytest.raises(ValueError, match=r"does not match the expected architecture; e\.g\. \['down_blocks_1'\]"
                                         r".*checkpoint \(16,\) vs model \(32,\)"):
        checkpoint_lib.load_policy_params(reference[0], other_architecture)


def test_resuming_with_another_architecture_names_the_tensor(reference, world, other_architecture):
    """What loop.train does on resume (restore onto the run's state shapes), with a different model: the
    error names config.model_path and a mismatched tensor instead of orbax's bare shape complaint."""
    config = th.tiny_dpo_config(*world)
    method = get_method(config.objective)(config)
    shapes = jax.eval_shape(lambda p: step_lib.init_train_state(p, optim.make_optimizer(config.optimizer), config,
                                                                method), other_architecture)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    manager = checkpoint_lib.CheckpointManager(reference[0])
    try:
        with pytest.raises(ValueError, match=r"does not match this run's model \(config\.model_path\); e\.g\. "
                                             r"\['down_blocks_1'\].*checkpoint \(16,\) vs model \(32,\)"):
            manager.restore(6, shapes, trainer.state_shardings(mesh, shapes, config, method))
    finally:
        manager.close()


def test_checkpoint_restores_onto_given_shardings(reference, world):
    """The same manager restores the state it saved onto the target shardings (here: one device)."""
    from jaxpref.models import load_pipeline

    workdir, _ = reference
    config = th.tiny_dpo_config(*world)
    run = trainer.build_run(config, load_pipeline(world[0]))
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    shapes, shardings = trainer.abstract_state(run, mesh)
    manager = checkpoint_lib.CheckpointManager(workdir)
    try:
        state, meta = manager.restore(6, shapes, shardings)
    finally:
        manager.close()
    assert int(state.step) == 6 and int(state.skipped) == 0
    assert th.tree_max_abs_diff(state.params, checkpoint_lib.load_policy_params(workdir)) == 0.0
    assert meta["seed"] == config.seed and len(meta["loaders"]) == 1
    loader = json.loads(base64.b64decode(meta["loaders"][0]))
    assert loader["last_seen_indices"] == {"0": 6 * config.batch_size - 1}  # 6 batches of 8 records read


def test_loader_positions_are_per_process():
    """Each process reads its own shard, so a checkpoint holds one loader position per process; resuming
    with another process count fails saying so (an older single-process "loader" key still restores)."""
    state = base64.b64encode(b"position").decode()
    assert train_lib._all_loader_states(b"position") == [state]
    assert train_lib._own_loader_state({"loaders": [state]}, "ckpt") == b"position"
    assert train_lib._own_loader_state({"loader": state}, "ckpt") == b"position"
    with pytest.raises(ValueError, match=r"ckpt: written by 2 process\(es\), resumed by 1.*Resume with 2 process"):
        train_lib._own_loader_state({"loaders": [state, state]}, "ckpt")


def test_dro_state_round_trips_exactly(world, tmp_path):
    """Everything DRO keeps besides φ and Adam survives save -> restore bit for bit: EMA, the stale sampling
    copy θ, the negatives buffer with its fill count and cursor, the skipped-update count."""
    from jaxpref.models import load_pipeline

    config = th.tiny_dpo_config(*world, objective="dro", **{"ema.enabled": True, "dro.refresh_every": 2,
                                                            "dro.buffer_size": 8, "dro.num_inference_steps": 4})
    params = load_pipeline(world[0]).unet_params
    method = get_method(config.objective)(config)
    init = lambda p: step_lib.init_train_state(p, optim.make_optimizer(config.optimizer), config, method,
                                               text_shape=(12, 16), latent_shape=(8, 8, 4))
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map(
        lambda x: (rng.integers(1, 8, x.shape) if np.issubdtype(x.dtype, np.integer) else
                   rng.standard_normal(x.shape)).astype(x.dtype), init(params))
    dro_state = state.method_state
    assert state.ema_params is not None and dro_state.sampler is not None and int(dro_state.negatives.filled) > 0
    shapes = jax.eval_shape(init, params)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    shardings = trainer.state_shardings(mesh, shapes, config, method)
    manager = checkpoint_lib.CheckpointManager(str(tmp_path))
    try:
        manager.save(7, jax.device_put(state, shardings), {"loaders": [], "seed": 0}, force=True)
        manager.wait()
        restored, meta = manager.restore(7, shapes, shardings)
    finally:
        manager.close()
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta == {"loaders": [], "seed": 0}
