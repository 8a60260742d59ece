"""Evaluation: the seed protocol, batching/device independence, reports, win rates, prompt-set readers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxpref import evaluate as ev
from jaxpref import prompts as prompts_lib
from jaxpref.models import load_pipeline
from jaxpref.rewards import Scorer, shapes_scorer
from tiny_sd import build_tiny_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = dict(num_images_per_prompt=2, sampler="ddpm", num_steps=3, guidance_scale=7.5, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")), seed=0)
    return folder, load_pipeline(folder)


@pytest.fixture(scope="module")
def shapes_prompts():
    return prompts_lib.load_prompts("shapes:test", limit=3)


def test_seed_protocol():
    np.testing.assert_array_equal(ev.image_seeds(3, 2, 10), [[10, 13], [11, 14], [12, 15]])


def test_images_do_not_depend_on_batching(tiny, shapes_prompts):
    """DDPM (fresh noise every step) so the per-image noise streams are exercised too."""
    _, pipe = tiny
    a = ev.generate(pipe, shapes_prompts, batch_size=4, **GEN)
    b = ev.generate(pipe, shapes_prompts, batch_size=3, **GEN)
    assert a.images.shape == (3, 2, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.seeds, [[5, 8], [6, 9], [7, 10]])
    # Different batch shapes change XLA's float summation order only (measured max |diff| 5e-5).
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)
    assert np.abs(a.images.astype(int) - b.images).max() <= 1
    # The same prompt at k = 0, 1 used different seeds; the first two prompts of a shorter set reuse seeds 5, 6.
    assert np.abs(a.latents[:, 0] - a.latents[:, 1]).max() > 0.1
    c = ev.generate(pipe, shapes_prompts.prompts[:2], batch_size=4, **{**GEN, "num_images_per_prompt": 1})
    np.testing.assert_array_equal(c.latents[:, 0], a.latents[:2, 0])


def test_evaluate_writes_report_and_win_rates(tiny, shapes_prompts, tmp_path):
    _, pipe = tiny
    brightness = Scorer("brightness", lambda im, p: im.reshape(len(im), -1).mean(axis=1) / 255.0, batch_size=4)
    scorers = {"shapes": shapes_scorer(), "brightness": brightness}
    out = str(tmp_path / "eval")
    metrics = ev.evaluate(pipe, shapes_prompts, scorers, out_dir=out, batch_size=4, **GEN)
    for key in ("shapes/mean", "shapes/median", "shapes/std", "brightness/mean", "generate/images_per_s"):
        assert np.isfinite(metrics[key]), key
    assert sorted(os.listdir(os.path.join(out, "images")))[:2] == ["00000_00.png", "00000_01.png"]
    assert Image.open(os.path.join(out, "grid.png")).size == (2 * 32, 3 * 32)
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["num_prompts"] == 3 and report["summary"]["shapes"]["n"] == 6
    scores = ev.load_scores(out)
    png = np.asarray(Image.open(os.path.join(out, "images", "00002_01.png")))
    assert scores["brightness"][2, 1] == pytest.approx(png.mean() / 255.0, abs=1e-6)
    assert "| shapes |" in open(os.path.join(out, "metrics.md")).read()
    # Against itself: every prompt ties, win rate 1/2; against a worse baseline: 1.
    same = ev.evaluate(pipe, shapes_prompts, {"brightness": brightness}, baseline_scores=scores, batch_size=4, **GEN)
    assert same["brightness/win_rate"] == pytest.approx(0.5)
    worse = {"brightness": scores["brightness"] - 1.0}
    better = ev.evaluate(pipe, shapes_prompts, {"brightness": brightness}, baseline_scores=worse, batch_size=4, **GEN)
    assert better["brightness/win_rate"] == 1.0


def test_compare_and_summaries():
    a = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 1.0]])   # prompt means 2, 2, 0.5
    b = np.array([1.0, 2.0, 4.0])
    got = ev.compare(a, b)
    assert {k: got[k] for k in ("win_rate", "wins", "ties", "n_prompts")} == {
        "win_rate": pytest.approx(0.5), "wins": pytest.approx(1 / 3), "ties": pytest.approx(1 / 3), "n_prompts": 3}
    assert got["mean_diff"] == pytest.approx((2 + 2 + 0.5) / 3 - (1 + 2 + 4) / 3)
    with pytest.raises(ValueError, match="same prompt set"):
        ev.compare(a, b[:2])
    summary = ev.summarize({"r": a}, categories=["x", "y", "x"])
    assert summary["r"]["mean"] == pytest.approx(1.5) and summary["r"]["median"] == pytest.approx(1.5)
    assert summary["r"]["by_category"]["x"]["mean"] == pytest.approx(1.25)
    flat = ev.flat_metrics(summary, {"r": ev.compare(a, b)})
    assert flat["r/x/mean"] == pytest.approx(1.25) and flat["r/win_rate"] == pytest.approx(0.5)
    assert "| r | x |" in ev.markdown_table(summary)


def test_log_to_tensorboard():
    class AddScalar:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, value, step))

    class WriteScalars:
        def write_scalars(self, step, scalars):
            self.got = (step, scalars)

    w = AddScalar()
    ev.log_to_tensorboard(w, {"pickscore/mean": 21.0}, 7)
    assert w.rows == [("eval/pickscore/mean", 21.0, 7)]
    c = WriteScalars()
    ev.log_to_tensorboard(c, {"a": 1}, 3)
    assert c.got == (3, {"eval/a": 1.0})


# ---------------------------------------------------------------------------------------------
# Prompt sets.

def test_prompt_readers(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert prompts_lib.load_prompts(str(tmp_path / "p.txt")).prompts == ("a cat", "a dog")
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\tNote\nA bird\tAnimals\tSimple\t\n"
                                        "A red car\tVehicles\tColors\tnote\n")
    parti = prompts_lib.load_prompts(f"parti:{tmp_path / 'parti.tsv'}")
    assert parti.prompts == ("A bird", "A red car") and parti.categories == ("Animals", "Vehicles")
    hpd = tmp_path / "benchmark"
    hpd.mkdir()
    for style in prompts_lib.HPDV2_STYLES:
        (hpd / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style} two"]))
    full = prompts_lib.load_prompts(str(hpd))
    assert len(full) == 8 and full.categories[:3] == ("anime", "anime", "concept-art")
    assert prompts_lib.load_prompts(f"hpdv2:{hpd / 'photo.json'}").prompts == ("photo one", "photo two")
    shapes = prompts_lib.load_prompts("shapes", limit=4)
    assert len(shapes) == 4 and shapes.name == "shapes/test[:4]"


def test_pickapic_parquet_dedupes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a", "b", "a", "c"], "label_0": [0.5, 1.0, 0.0, 1.0]}),
                   tmp_path / "test_unique-00000-of-00001.parquet")
    assert prompts_lib.load_prompts(f"pickapic:{tmp_path}").prompts == ("a", "b", "c")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="wrong.parquet.*caption"):
        prompts_lib.load_prompts(f"pickapic:{tmp_path / 'wrong.parquet'}")


def test_wrong_prompt_files_fail_with_path(tmp_path):
    (tmp_path / "p.txt").write_text("just a prompt\n")
    with pytest.raises(ValueError, match="p.txt.*Prompt"):
        prompts_lib.load_prompts(f"parti:{tmp_path / 'p.txt'}")
    (tmp_path / "anime.json").write_text(json.dumps({"prompts": ["x"]}))
    with pytest.raises(ValueError, match="anime.json.*JSON list"):
        prompts_lib.load_prompts(str(tmp_path / "anime.json"))
    with pytest.raises(ValueError, match="missing"):
        prompts_lib.load_prompts(f"hpdv2:{tmp_path}")
    with pytest.raises(ValueError, match="no such prompt file"):
        prompts_lib.load_prompts(f"txt:{tmp_path / 'nope.txt'}")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        prompts_lib.load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="KIND:PATH"):
        prompts_lib.load_prompts(str(tmp_path / "prompts.csv"))


# ---------------------------------------------------------------------------------------------
# The command line, on two (virtual) devices: same images as one device.

def test_cli_on_two_devices_matches_one(tiny, shapes_prompts, tmp_path):
    folder, pipe = tiny
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "jaxpref.evaluate", f"--model_path={folder}", "--prompts=shapes:test",
           "--num_prompts=3", "--reward=shapes", f"--out={out}", "--num_images_per_prompt=2", "--sampler=ddpm",
           "--num_steps=3", "--guidance_scale=7.5", "--seed=5", "--batch_size=3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| shapes |" in proc.stdout and "on 2 device(s): ddpm, 3 steps, guidance 7.5" in proc.stdout
    ref = ev.generate(pipe, shapes_prompts, batch_size=4, **GEN)
    cli = np.stack([np.stack([np.asarray(Image.open(os.path.join(out, "images", f"{i:05d}_{k:02d}.png")))
                              for k in range(2)]) for i in range(3)])
    assert np.abs(cli.astype(int) - ref.images).max() <= 1
    expected = ev.score(ref.images, shapes_prompts, {"shapes": shapes_scorer()})["shapes"]
    np.testing.assert_allclose(ev.load_scores(out)["shapes"], expected, atol=0.02)


class _Flags:
    """The parts of absl's FlagValues that ``_resolve_flags`` reads: values, and which were given."""

    def __init__(self, given: dict, **values):
        defaults = dict(model_path=None, sampler="ddpm", num_steps=50, guidance_scale=7.5, num_images_per_prompt=5,
                        seed=0, batch_size=8, num_prompts=0, prompts="shapes", reward="", config=None, checkpoint=None)
        self.__dict__.update({**defaults, **values, **given})
        self._given = set(given)

    def __getitem__(self, name):
        return type("Flag", (), {"present": name in self._given})()


def test_a_training_workdir_is_evaluated_with_its_own_settings(tmp_path):
    """--checkpoint=<workdir> without --config: the run's config.json, with its accepted changes, supplies the
    base model and the evaluation settings; a flag given still wins."""
    from jaxpref import config_lib, run_config

    workdir = str(tmp_path / "run")
    config = config_lib.load_config("tiny")       # DDIM 25, CFG 3, 4 images per prompt on embedded:tiny
    run_config.record(workdir, config, {})
    run_config.record(workdir, config, {"eval.num_steps": (25, 10)})   # a later start changed it
    s = ev._resolve_flags(_Flags({"guidance_scale": 2.0}, checkpoint=workdir))
    assert s["model_path"] == "embedded:tiny" and s["sampler"] == config.eval.sampler
    assert s["num_steps"] == 10 and s["guidance_scale"] == 2.0
    assert s["num_images_per_prompt"] == config.eval.images_per_prompt and s["num_prompts"] == config.eval.num_prompts
    assert s["reward"] == config.eval.rewards == "shapes"
    plain = ev._resolve_flags(_Flags({}, checkpoint=str(tmp_path / "elsewhere")))  # not a workdir: the flags'
    assert plain["num_steps"] == 50 and plain["model_path"] is None and plain["reward"] == ""


def test_a_runs_own_data_split_is_read_from_its_data_dir():
    """A real model's run evaluates on ``data:test_unique``: jaxpref.evaluate with that run's --config (or
    workdir) reads it, or a given ``data:``/dir-less ``tfds:`` spec, from the run's dataset and data_dir."""
    from jaxpref import config_lib

    c = config_lib.load_config("dposd15")
    c.data.data_dir = "gs://bucket/tfds"
    assert ev._resolve_flags(_Flags({}, config=c))["prompts"] == "tfds:pickapic_v2:test_unique:gs://bucket/tfds"
    given = ev._resolve_flags(_Flags({"prompts": "data:validation_unique, parti:/x.tsv"}, config=c))
    assert given["prompts"] == "tfds:pickapic_v2:validation_unique:gs://bucket/tfds,parti:/x.tsv"
    assert ev._resolve_flags(_Flags({}, config=c))["reward"] == "pickscore=yuvalkirstain/PickScore_v1"
