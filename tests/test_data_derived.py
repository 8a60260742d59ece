"""Derived datasets: latent cache, reward scores, DRO experts — results, resumption, bad input."""
import numpy as np
import pytest

from jaxpref.data import common
from jaxpref.world import shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from jaxpref.data import prepare_shapes

    d = tmp_path_factory.mktemp("tfds")
    b = prepare_shapes(d, n_train_pairs=48, seed=3)
    return d, "shapes/" + b.builder_config.name


def encode(images):
    """Stand-in VAE encoder: 8x8 average pool to 4 channels, fixed std."""
    x = np.asarray(images, np.float32) / 127.5 - 1
    B, H, W, _ = x.shape
    m = x.reshape(B, H // 8, 8, W // 8, 8, 3).mean((2, 4))
    m = np.concatenate([m, m[..., :1] * 0.5], -1)
    return m, np.full_like(m, 0.25) + m * 0.01


def _records(src):
    return [src[i] for i in range(len(src))]


def test_latent_cache_resumes_to_the_same_result(data, tmp_path):
    from jaxpref.data import build_latent_cache, open_source

    d, name = data
    full = build_latent_cache(name, tmp_path / "a", encode, data_dir=d, shard_size=10, batch_size=4, flips=True)
    part = build_latent_cache(name, tmp_path / "b", encode, data_dir=d, shard_size=10, batch_size=4, flips=True,
                              max_shards=2)
    assert not part["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        open_source(tmp_path / "b")
    done = build_latent_cache(name, tmp_path / "b", encode, data_dir=d, shard_size=10, batch_size=4, flips=True)
    assert done["complete"] and done["num_records"] == full["num_records"]
    a, b = _records(open_source(tmp_path / "a")), _records(open_source(tmp_path / "b"))
    assert len(a) == len(b) == len(open_source(name, "train", d))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    with pytest.raises(ValueError, match="different latents job"):
        build_latent_cache(name, tmp_path / "b", encode, data_dir=d, shard_size=10, dtype="bfloat16")

    pairs = open_source(name, "train", d)
    rec, src_rec = a[5], pairs[int(a[5]["index"])]
    img0 = common.decode_image(src_rec["jpg_0"])
    m, s = encode(np.stack([img0, img0[:, ::-1]]))
    assert rec["latent_mean"].dtype == np.float16 and rec["latent_mean"].shape == (2, 4, 4, 4)
    np.testing.assert_allclose(rec["latent_mean"][0], m[0], atol=2e-3)
    np.testing.assert_allclose(rec["latent_mean_flip"][0], m[1], atol=2e-3)
    np.testing.assert_allclose(rec["latent_std"][0], s[0], atol=2e-3)
    assert rec["reward_0"] == src_rec["reward_0"] and rec["caption"] == src_rec["caption"].decode()


def test_latent_loader_batches_and_restore(data, tmp_path):
    from jaxpref.data import build_latent_cache, make_loader, open_source

    d, name = data
    build_latent_cache(name, tmp_path / "c", encode, data_dir=d, shard_size=16, dtype="bfloat16")
    src = open_source(tmp_path / "c")
    it = make_loader(src, 4, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["latent_mean"].shape == (4, 2, 4, 4, 4) and b["latent_mean"].dtype.name == "bfloat16"
    assert b["input_ids"].shape == (4, 16) and "rewards_norm" in b and (b["label"] == 1).all()
    state = it.get_state()
    nxt = [next(it) for _ in range(3)]
    again = make_loader(src, 4, seed=0, process_index=0, process_count=1)
    again.set_state(state)
    for x in nxt:
        y = next(again)
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k], np.float32), np.asarray(y[k], np.float32))


def test_latent_cache_skips_and_counts_corrupt_images(data, tmp_path, monkeypatch):
    from jaxpref.data import build_latent_cache, cache
    from jaxpref.data.sources import Source

    good = common.encode_image(np.zeros((16, 16, 3), np.uint8))
    rows = [{"caption": "a red circle on a blue background", "jpg": good, "reward": np.float32(i)} for i in range(6)]
    rows[2]["jpg"] = good[:40]
    mem = Source(rows, name="mem/images", split="train", kind="images")
    monkeypatch.setattr(cache, "open_source", lambda *a, **k: mem)
    meta = build_latent_cache("mem", tmp_path / "m", encode, shard_size=4)
    assert meta["num_records"] == 5
    assert [(s["row"], s["reason"].split(":")[0]) for s in meta["report"]["skipped"]] == [(2, "corrupt image")]


def test_scores_match_the_reward_and_join(data, tmp_path):
    from jaxpref.data import build_scores, open_source

    d, name = data
    part = build_scores(name, tmp_path / "s", shapes.score_fn, data_dir=d, scorer_name="shapes", shard_size=16,
                        max_shards=1)
    assert not part["complete"]
    meta = build_scores(name, tmp_path / "s", shapes.score_fn, data_dir=d, scorer_name="shapes", shard_size=16)
    plain = open_source(name, "train", d)
    scored = open_source(name, "train", d, scores=tmp_path / "s")
    stored = np.asarray([[plain[i]["reward_0"], plain[i]["reward_1"]] for i in range(len(plain))])
    joined = np.asarray([[scored[i]["reward_0"], scored[i]["reward_1"]] for i in range(len(scored))])
    np.testing.assert_allclose(joined, stored, atol=1e-6)
    assert meta["reward_min"] == pytest.approx(stored.min()) and meta["reward_max"] == pytest.approx(stored.max())
    assert scored.reward_range == (meta["reward_min"], meta["reward_max"])
    with pytest.raises(ValueError, match="was computed for"):
        open_source(name, "test_unique", d, scores=tmp_path / "s")


def test_experts_are_the_global_top_k_unique_images(data, tmp_path):
    from jaxpref.data import build_experts, make_loader, open_source

    d, name = data
    k = 12
    meta = build_experts(name, tmp_path / "e", shapes.score_fn, k=k, data_dir=d, scorer_name="shapes", shard_size=10)
    src = open_source(name, "train", d)
    everything = {}
    for i in range(len(src)):
        r = src[i]
        for slot in (0, 1):
            everything[r[f"image_{slot}_uid"].decode()] = float(r[f"reward_{slot}"])
    assert meta["unique_scored"] == len(everything) == 2 * len(src)
    experts = open_source(tmp_path / "e")
    got = [experts[i] for i in range(len(experts))]
    assert len(got) == k
    want = sorted(everything.values(), reverse=True)[:k]
    np.testing.assert_allclose([g["reward"] for g in got], want, atol=1e-6)  # best first
    for g in got:
        assert everything[g["uid"]] == pytest.approx(float(g["reward"]), abs=1e-6)
        assert shapes.reward(common.decode_image(g["jpg"]), g["caption"]) == pytest.approx(float(g["reward"]), abs=1e-6)
    b = next(make_loader(experts, 4, process_index=0, process_count=1))
    assert b["images"].shape == (4, 32, 32, 3) and b["reward"].shape == (4,)
    # Built: a second call (each training run makes one) reads it and writes nothing, so runs started together
    # on one data dir never replace the file under each other.
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "e").iterdir()}
    assert build_experts(name, tmp_path / "e", shapes.score_fn, k=k, data_dir=d, scorer_name="shapes",
                         shard_size=10) == meta
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "e").iterdir()} == written


def test_experts_count_an_image_shown_in_several_pairs_once(tmp_path, monkeypatch):
    from jaxpref.data import build_experts, experts
    from jaxpref.data.sources import Source

    rng = np.random.default_rng(0)
    cap = "a red circle on a blue background"
    imgs = {u: shapes.render(cap, rng, 32, fl) for u, fl in (("best", ()), ("mid", ("blur",)), ("bad", ("color",)))}
    enc = {u: common.encode_image(im) for u, im in imgs.items()}
    pairs = [("best", "mid"), ("best", "bad"), ("mid", "bad"), ("best", "mid")]
    rows = [{"caption": cap, "jpg_0": enc[a], "jpg_1": enc[b], "image_0_uid": a, "image_1_uid": b,
             "label_0": np.float32(1), "label_1": np.float32(0)} for a, b in pairs]
    monkeypatch.setattr(experts, "open_source", lambda *a, **k: Source(rows, name="mem", split="train", kind="pairs"))
    meta = build_experts("mem", tmp_path / "e", shapes.score_fn, k=2, shard_size=2)
    from jaxpref.data import open_source

    got = open_source(tmp_path / "e")
    assert [got[i]["uid"] for i in range(len(got))] == ["best", "mid"]
    assert meta["num_records"] == 2
