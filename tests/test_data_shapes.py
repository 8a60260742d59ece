"""The shapes world: grammar, renders, the analytic reward, and the `shapes` TFDS builder."""
import numpy as np
import pytest

from jaxpref.world import shapes


def _captions(n, seed):
    caps = shapes.all_captions()
    return [caps[i] for i in np.random.default_rng(seed).integers(0, len(caps), n)]


def test_grammar_round_trip_and_splits():
    caps = shapes.all_captions()
    assert len(caps) == len(set(caps)) == 225
    for c in caps:
        assert shapes.parse_caption(c).caption == c
    with pytest.raises(ValueError):
        shapes.parse_caption("a red circle on a red background")
    with pytest.raises(ValueError):
        shapes.parse_caption("two red circle on a blue background")
    sp = shapes.caption_splits()
    assert not set(sp["train"]) & (set(sp["validation"]) | set(sp["test"]))
    assert len(sp["train"]) + len(sp["validation"]) + len(sp["test"]) == 225
    assert shapes.heldout_prompts() == sp["test"] == shapes.caption_splits()["test"]  # stable


def test_render_deterministic_and_shaped():
    a = shapes.render("two green squares on a white background", np.random.default_rng(3), 32, ("blur",))
    b = shapes.render("two green squares on a white background", np.random.default_rng(3), 32, ("blur",))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert shapes.render("a red circle on a blue background", np.random.default_rng(0), 48).shape == (48, 48, 3)


@pytest.mark.parametrize("flaw", shapes.FLAWS)
def test_reward_ranks_correct_above_each_flaw(flaw):
    caps = _captions(150, seed=shapes.FLAWS.index(flaw))
    rng = np.random.default_rng(1)
    clean = np.stack([shapes.render(c, rng) for c in caps])
    bad = np.stack([shapes.render(c, rng, 32, (flaw,)) for c in caps])
    rc, rb = shapes.reward_batch(clean, caps), shapes.reward_batch(bad, caps)
    assert rc.min() >= 0 and rc.max() <= 1 and rb.min() >= 0
    assert rc.mean() > 0.95
    assert rc.mean() - rb.mean() > 0.08, (flaw, rc.mean(), rb.mean())
    assert (rc > rb).mean() >= 0.95, (flaw, (rc > rb).mean())


def test_reward_clean_above_blurred_and_input_ranges():
    caps = _captions(100, seed=7)
    rng = np.random.default_rng(2)
    clean = np.stack([shapes.render(c, rng) for c in caps])
    for sigma in (0.8, 1.5):
        blurred = np.stack([shapes.blur(im, sigma) for im in clean])
        assert (shapes.reward_batch(clean, caps) > shapes.reward_batch(blurred, caps)).mean() >= 0.95
    r = shapes.reward_batch(clean, caps)
    np.testing.assert_allclose(shapes.reward_batch(clean / 255.0, caps), r, atol=1e-5)
    np.testing.assert_allclose(shapes.reward_batch(clean / 127.5 - 1, caps, value_range=(-1, 1)), r, atol=1e-5)
    assert shapes.reward(clean[0], caps[0]) == pytest.approx(float(r[0]))
    # the terms do what they say: count from components, background from the border
    t = shapes.reward_terms(clean, caps)
    np.testing.assert_array_equal(t["count_found"], [shapes.parse_caption(c).count for c in caps])


def test_reward_is_meaningful_on_generated_like_images():
    """Noisy, blurry images of the right content still beat sharp images of the wrong content."""
    caps = _captions(100, seed=11)
    rng = np.random.default_rng(4)
    blurry_right = np.stack([shapes.blur(shapes.render(c, rng, 32, noise_std=10), 1.0) for c in caps])
    wrong = np.stack([shapes.render(c, rng, 32, ("color", "shape")) for c in caps])
    assert (shapes.reward_batch(blurry_right, caps) > shapes.reward_batch(wrong, caps)).mean() >= 0.9


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from jaxpref.data import prepare_shapes

    d = tmp_path_factory.mktemp("tfds")
    return d, prepare_shapes(d, n_train_pairs=120, seed=1), prepare_shapes(d, "base", per_caption=2)


def test_shapes_builder_pairs(built):
    from jaxpref.data import load_prompts, open_source

    d, b, _ = built
    splits = shapes.caption_splits()
    train = open_source("shapes/" + b.builder_config.name, "train", d)
    assert train.kind == "pairs" and 100 <= len(train) < 120  # reward ties dropped
    caps = set()
    for i in range(len(train)):
        ex = train[i]
        assert ex["label_0"] == 1.0 and ex["label_1"] == 0.0
        assert ex["reward_0"] - ex["reward_1"] > 0.02  # winner first, no ties
        img0 = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(__import__("io").BytesIO(ex["jpg_0"])))
        assert img0.shape == (32, 32, 3)
        assert shapes.reward(img0, ex["caption"].decode()) == pytest.approx(ex["reward_0"], abs=1e-6)
        caps.add(ex["caption"].decode())
    assert caps <= set(splits["train"])
    test_prompts = load_prompts("shapes/" + b.builder_config.name, "test_unique", d)
    assert sorted(test_prompts) == splits["test"]
    assert train.reward_range[0] < train.reward_range[1] <= 1.0
    # cached: a second call returns at once from the same folder
    from jaxpref.data import prepare_shapes

    assert prepare_shapes(d, n_train_pairs=120, seed=1).data_dir == b.data_dir


def test_shapes_builder_base(built):
    from jaxpref.data import open_source

    d, _, b = built
    src = open_source("shapes/" + b.builder_config.name, "train", d)
    assert src.kind == "images" and len(src) == 2 * len(shapes.caption_splits()["train"])
    rewards = np.asarray([src[i]["reward"] for i in range(len(src))])
    assert rewards.max() > 0.95 and rewards.min() < 0.8  # a mix of clean and flawed


def test_wrong_data_dir_says_what_it_expected(tmp_path):
    from jaxpref.data import open_source

    with pytest.raises(ValueError, match="expected a prepared pickapic_v2/default dataset"):
        open_source("pickapic_v2", "train", tmp_path)
    with pytest.raises(ValueError, match="expected a finished"):
        open_source(tmp_path / "nothing_here")


def test_runs_started_together_build_the_world_once(tmp_path):
    """Two builds of one config into a fresh data dir at the same time (two trainings started together): both
    return the built dataset (TFDS alone fails the second one's final rename: FileExistsError)."""
    import concurrent.futures

    from jaxpref.data import prepare_shapes

    build = lambda _: prepare_shapes(tmp_path, n_train_pairs=40, seed=5)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(build, range(2))
    assert a.is_prepared() and a.data_dir == b.data_dir
    assert a.info.splits["train"].num_examples == b.info.splits["train"].num_examples > 0
