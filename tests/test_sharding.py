"""Sharding: the fsdp rule, the mesh, and the train loop on 8 simulated CPU devices (data=2 x fsdp=4)
matching 1 device, with a checkpoint written on 8 devices restored on 2.

The 8- and 2-device runs are child processes (XLA's device count is fixed when jax starts); the 1-device
reference is the in-process run test_train.py also uses (shared per session).
"""
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

import train_helpers as th
from jaxpref import sharding

# The tiny UNet's tensors are all under the 2**14-element fsdp threshold; the child runs shard >= 256.
MIN_SIZE = 256


def test_fsdp_spec_shards_the_largest_divisible_dim_of_big_tensors():
    assert sharding.fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((4096, 5), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((3, 3, 321, 641), 4, min_size=1) == P()       # nothing divides: replicate
    assert sharding.fsdp_spec((320,), 4) == P()                             # small: replicate
    assert sharding.fsdp_spec((320,), 4, min_size=64) == P("fsdp")
    assert sharding.fsdp_spec((3, 3, 320, 640), 1) == P()                   # no fsdp axis


def test_rules_are_data_first_match_wins_and_bad_ones_are_named():
    """(regex over the leaf path, rule) pairs decide each leaf, on an abstract 2 x 4 (data, fsdp) mesh."""
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((2, 4), sharding.BATCH_AXES)
    tree = {"params": {"big": jax.ShapeDtypeStruct((64, 1024), "float32"),
                       "norm": jax.ShapeDtypeStruct((1024,), "float32")},
            "method_state": {"negatives": {"latents": jax.ShapeDtypeStruct((16, 4, 8), "float32")}},
            "ref": {"big": jax.ShapeDtypeStruct((64, 1024), "float32")}}
    rules = ((r"method_state/negatives/.*", "rows"), (r"ref/.*", "replicate"), (r".*", "fsdp(min_size=1000)"))
    got = jax.tree_util.tree_map(lambda s: s.spec, sharding.tree_sharding(mesh, tree, rules))
    assert got["params"]["big"] == P(None, "fsdp")
    assert got["params"]["norm"] == P("fsdp")                   # 1024 >= min_size 1000
    assert got["method_state"]["negatives"]["latents"] == P(sharding.BATCH_AXES)
    assert got["ref"]["big"] == P()                             # the first match wins over ".*"
    default = jax.tree_util.tree_map(lambda s: s.spec, sharding.tree_sharding(mesh, tree))
    assert default["params"]["norm"] == P() and default["params"]["big"] == P(None, "fsdp")
    with pytest.raises(ValueError, match=r"sharding rule 'fsdp\(size=3\)'"):
        sharding.parse_rule("fsdp(size=3)")


def test_make_mesh_fills_one_axis_and_names_a_bad_shape():
    n = jax.device_count()
    mesh = sharding.make_mesh(-1, 1)
    assert dict(mesh.shape) == {"data": n, "fsdp": 1}
    with pytest.raises(ValueError, match=r"config\.mesh: data=3 x fsdp=5"):
        sharding.make_mesh(3, 5)


def test_fsdp_splits_almost_all_of_sd15(sd15_unet_shapes):
    """On SD1.5's UNet (shapes only) the rule shards > 99% of the param bytes over fsdp=8: what stays
    replicated (norms, biases) is small, so per-device params + Adam state shrink ~8x."""
    leaves = jax.tree_util.tree_leaves(sd15_unet_shapes)
    sharded = sum(x.size for x in leaves if sharding.fsdp_spec(x.shape, 8) != P())
    total = sum(x.size for x in leaves)
    assert sharded / total > 0.99, sharded / total


@pytest.fixture(scope="module")
def eight_devices(world, tmp_path_factory):
    """Steps 0 -> 3 on 8 devices, mesh (data=2, fsdp=4); checkpoint 3 left in the workdir."""
    workdir = str(tmp_path_factory.mktemp("eight") / "run")
    proc = th.run_script("mesh", dict(workdir=workdir, model_path=world[0], data_dir=world[1], min_size=MIN_SIZE,
                                      data=2, fsdp=4, max_steps=3), num_devices=8)
    return workdir, th.script_result(proc, timeout=600)


def _check_fsdp(save, fsdp):
    """The biggest param is split 1/fsdp along the dim its spec names, over every device of the mesh."""
    dim = save["spec"].index("fsdp")
    assert save["shard_shape"][dim] * fsdp == save["shape"][dim]
    assert [s for i, s in enumerate(save["shard_shape"]) if i != dim] == [
        s for i, s in enumerate(save["shape"]) if i != dim]
    assert save["sharded_leaves"] > 10 and save["opt_sharded"] >= 2 * save["sharded_leaves"]  # Adam mu, nu too


@pytest.mark.slow
def test_eight_devices_match_one_device(eight_devices, reference):
    """data=2 x fsdp=4 on 8 simulated devices vs 1 device, same config and batches (per-pair randomness is
    keyed by the pair's index, not its device), steps 1-3. Measured: losses 1.2e-5 relative (step 1 is
    log 2 on both), grad norms 2e-6, ref_gap 1.6e-7 absolute."""
    _, result = eight_devices
    assert result["devices"] == 8 and result["step"] == 3
    save = result["saves"][0]
    assert save["mesh"] == {"data": 2, "fsdp": 4} and save["num_devices"] == 8
    _check_fsdp(save, 4)
    th.check_close(result["history"], reference[1]["history"][:3], [1, 2, 3], "8 devices vs 1")


@pytest.mark.slow
def test_checkpoint_from_eight_devices_resumes_on_two(eight_devices, reference, world):
    """A 2-device process (mesh data=1, fsdp=2) restores the 8-device checkpoint (resharded fsdp 4 -> 2)
    and continues 3 -> 6: steps 4-6 match the uninterrupted 1-device run (measured: losses 2.2e-5 relative,
    grad norms 5e-6, ref_gap 9e-8) and so do the exported params (measured max |difference| 1.2e-6;
    tolerance 1e-4: Adam moves a param by up to lr = 3e-4 a step)."""
    from jaxpref.models import load_unet

    workdir, _ = eight_devices
    proc = th.run_script("mesh", dict(workdir=workdir, model_path=world[0], data_dir=world[1], min_size=MIN_SIZE,
                                      data=1, fsdp=2), num_devices=2)
    result = th.script_result(proc, timeout=600)
    assert result["devices"] == 2 and result["step"] == 6
    save = result["saves"][0]
    assert save["mesh"] == {"data": 1, "fsdp": 2} and save["step"] == 6
    _check_fsdp(save, 2)
    th.check_close(result["history"], reference[1]["history"][3:], [4, 5, 6], "8 -> 2 devices vs 1")
    diff = th.tree_max_abs_diff(load_unet(os.path.join(workdir, "export", "unet"))[1],
                                load_unet(os.path.join(reference[0], "export", "unet"))[1])
    print(f"8 -> 2 devices vs 1: max |param difference| after 6 steps {diff:.1e}")
    assert diff < 1e-4
