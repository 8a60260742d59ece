"""The run's figures: before_after.png shows each prompt's base and trained images side by side, upscaled
by pixel repetition (checked against np.repeat of the saved images), and reward_curve.png is drawn
from the run's eval rows."""
import json
import os

import numpy as np
from PIL import Image

from jaxpref import figures

PROMPTS = ["a red circle on a white background", "two blue squares on a black background", "a green triangle"]


def fake_evaluation(folder, seed, k=4, size=16):
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, "images"))
    images = rng.randint(0, 256, (len(PROMPTS), k, size, size, 3)).astype(np.uint8)
    for i in range(len(PROMPTS)):
        for j in range(k):
            Image.fromarray(images[i, j]).save(os.path.join(folder, "images", f"{i:05d}_{j:02d}.png"))
    with open(os.path.join(folder, "prompts.json"), "w") as f:
        json.dump(PROMPTS, f)
    np.savez(os.path.join(folder, "scores.npz"), __seeds__=np.arange(k), shapes=rng.rand(len(PROMPTS), k))
    return images


def find(canvas, tile):
    """(y, x) of every exact occurrence of ``tile`` in ``canvas`` (top-left corners)."""
    h, w = tile.shape[:2]
    ys, xs = np.nonzero(np.all(canvas[:-h + 1 or None, :-w + 1 or None] == tile[0, 0], axis=-1))
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(canvas[y:y + h, x:x + w], tile)]


def test_before_after_puts_each_prompts_base_and_trained_images_side_by_side(tmp_path):
    base = fake_evaluation(str(tmp_path / "base"), 0)
    trained = fake_evaluation(str(tmp_path / "trained"), 1)
    out = figures.before_after(str(tmp_path / "base"), str(tmp_path / "trained"), str(tmp_path / "ba.png"), size=96)
    canvas = np.asarray(Image.open(out).convert("RGB"))
    upscale = lambda a: np.repeat(np.repeat(a, 6, axis=0), 6, axis=1)   # 16 px -> 96 px, nearest
    for i in range(len(PROMPTS)):
        (yb, xb), = find(canvas, upscale(base[i, 0]))
        (yt, xt), = find(canvas, upscale(trained[i, 0]))
        assert yb == yt, "a prompt's base and trained images share a row"
        assert xt > xb + 3 * 96, "trained column to the right of all base images"
        if i:
            assert yb > previous_y, "one row per prompt, in order"
        previous_y = yb
        for j in range(1, 4):
            assert find(canvas, upscale(base[i, j])) == [(yb, xb + j * (96 + 6))]


def test_reward_curve_reads_the_eval_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "train/loss": 1.0}, {"step": 50, "eval/shapes/mean": 0.6},
            {"step": 100, "eval/shapes/mean": 0.7}, {"step": 100, "eval/shapes/mean": 0.71}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    points = figures.eval_history(str(path), "shapes/mean")
    assert points == [(50, 0.6), (100, 0.71)]
    out = figures.reward_curve([(0, 0.5)] + points, str(tmp_path / "curve.png"), base=0.5)
    assert Image.open(out).size[0] >= 400
