"""The grain loader: determinism, checkpoint/restore, per-host shards, augmentations, global arrays."""
import numpy as np
import pytest

from jaxpref.data import common


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from jaxpref.data import open_source, prepare_shapes

    d = tmp_path_factory.mktemp("tfds")
    b = prepare_shapes(d, n_train_pairs=100, seed=2)
    return open_source("shapes/" + b.builder_config.name, "train", d)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _loader(src, **kw):
    from jaxpref.data import make_loader

    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return make_loader(src, kw.pop("batch", 8), **kw)


def test_same_seed_same_batches(src):
    a, b = _take(_loader(src, seed=5), 4), _take(_loader(src, seed=5), 4)
    for x, y in zip(a, b):
        _same(x, y)
    c = _take(_loader(src, seed=6), 1)[0]
    assert not np.array_equal(a[0]["index"], c["index"])
    assert a[0]["images"].shape == (8, 2, 32, 32, 3) and a[0]["images"].dtype == np.uint8
    assert a[0]["input_ids"].shape == (8, 16) and a[0]["rewards"].shape == (8, 2)
    assert (a[0]["label"] == 1).all() and (a[0]["rewards"][:, 0] > a[0]["rewards"][:, 1]).all()


@pytest.mark.parametrize("skip", [3, 10])  # mid-epoch, and a restore whose next batches cross the epoch end
def test_restore_continues_with_the_next_batch(src, skip):
    it = _loader(src, seed=1)
    _take(it, skip)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = _loader(src, seed=1)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 4)):
        _same(x, y)


def test_two_processes_read_disjoint_shards_covering_the_split(src):
    seen = []
    for p in range(2):
        it = _loader(src, seed=3, num_epochs=1, drop_remainder=False, process_index=p, process_count=2)
        idx = np.concatenate([b["index"] for b in it])
        assert len(idx) == len(set(idx.tolist())) == len(src) // 2
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(2 * (len(src) // 2)))  # grain drops the n % hosts remainder
    assert max(seen[0]) < min(seen[1])  # each host reads its own contiguous range of records
    from jaxpref.data import make_loader

    with pytest.raises(ValueError, match="not divisible"):
        make_loader(src, 7, process_index=0, process_count=2)


def test_flip_is_shared_by_both_images_of_a_pair(src):
    flipped = _take(_loader(src, seed=4), 3)
    plain = _take(_loader(src, seed=4, random_flip=False), 3)
    n_flipped = 0
    for f, p in zip(flipped, plain):
        np.testing.assert_array_equal(f["index"], p["index"])
        for fi, pi in zip(f["images"], p["images"]):
            same = [np.array_equal(fi[j], pi[j]) for j in (0, 1)]
            mirrored = [np.array_equal(fi[j], pi[j][:, ::-1]) for j in (0, 1)]
            assert same == [True, True] or mirrored == [True, True]
            n_flipped += mirrored[0] and not same[0]
    assert 0 < n_flipped < 24


def _mem_source(reward_range=None):
    from jaxpref.data.sources import Source

    rows = []
    for i in range(16):
        a, b = np.full((8, 8, 3), i, np.uint8), np.full((8, 8, 3), 100 + i, np.uint8)
        rows.append({"caption": b"a red circle on a blue background", "jpg_0": common.encode_image(a),
                     "jpg_1": common.encode_image(b), "label_0": np.float32(1.0), "label_1": np.float32(0.0),
                     "reward_0": np.float32(i % 2), "reward_1": np.float32(1 - i % 2)})
    return Source(rows, name="mem", split="train", kind="pairs", reward_range=reward_range)


def test_order_by_reward_and_normalised_rewards():
    mem = _mem_source(reward_range=(0.0, 2.0))
    b = _take(_loader(mem, seed=0, order="reward", random_flip=False), 1)[0]
    assert (b["rewards"][:, 0] == 1).all() and (b["rewards"][:, 1] == 0).all()
    np.testing.assert_allclose(b["rewards_norm"], b["rewards"] / 2)
    swapped = b["index"] % 2 == 0  # these had reward_1 > reward_0
    np.testing.assert_array_equal(b["images"][:, 0, 0, 0, 0], np.where(swapped, 100 + b["index"], b["index"]))
    np.testing.assert_array_equal(b["label"], np.where(swapped, 0.0, 1.0))
    by_label = _take(_loader(mem, seed=0, order="label", random_flip=False), 1)[0]
    np.testing.assert_array_equal(by_label["images"][:, 0, 0, 0, 0], by_label["index"])


def test_require_rewards():
    mem = _mem_source()
    nan = [dict(r, reward_0=np.float32(np.nan)) for r in mem.data]
    from jaxpref.data.sources import Source

    with pytest.raises(ValueError, match="jaxpref.data.scores"):
        _loader(Source(nan, name="nan", split="train", kind="pairs"), require_rewards=True)


def test_resize_random_crop(src):
    b = _take(_loader(src, resolution=24, crop="random"), 1)[0]
    assert b["images"].shape == (8, 2, 24, 24, 3)


def test_global_arrays_on_a_sharding(src):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    host = _take(_loader(src, seed=9, keep_captions=True), 1)[0]
    glob = _take(_loader(src, seed=9, keep_captions=True, sharding=sharding), 1)[0]
    assert isinstance(glob["images"], jax.Array) and glob["images"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(glob["images"]), host["images"])
    assert isinstance(glob["caption"], np.ndarray)  # strings stay on the host


def test_worker_processes_give_the_same_batches(src):
    a = _take(_loader(src, seed=8), 2)
    it = _loader(src, seed=8, worker_count=1)
    b = _take(it, 2)
    for x, y in zip(a, b):
        _same(x, y)
    state = it.get_state()
    nxt = next(it)
    fresh = _loader(src, seed=8, worker_count=1)  # grain states restore with the same worker count
    fresh.set_state(state)
    _same(nxt, next(fresh))
