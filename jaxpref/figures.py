"""The figures a run leaves for a person: base vs trained side by side, and held-out reward vs step.

Both read what the evaluations already wrote (an evaluation folder holds images/, prompts.json and
scores.npz; metrics.jsonl holds the intermediate ``eval/`` rows), so they can be redrawn after a run.
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxpref import fileio

WHITE, BLACK, GRAY = (255, 255, 255), (0, 0, 0), (110, 110, 110)
GREEN, RED = (20, 130, 40), (190, 30, 30)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _evaluation(eval_dir: str, reward: str | None):
    """(prompts, images [N][K] paths, scores [N, K], reward name) of one evaluation folder."""
    with fileio.open_file(os.path.join(eval_dir, "prompts.json")) as f:
        prompts = json.load(f)
    with fileio.open_file(os.path.join(eval_dir, "scores.npz"), "rb") as f, np.load(f) as data:
        names = [k for k in data.files if k != "__seeds__"]
        reward = reward or names[0]
        scores = data[reward]
    paths = [[os.path.join(eval_dir, "images", f"{i:05d}_{k:02d}.png") for k in range(scores.shape[1])]
             for i in range(scores.shape[0])]
    return prompts, paths, scores, reward


def before_after(base_dir: str, trained_dir: str, path: str, *, max_prompts: int = 10, images_per_side: int = 4,
                 size: int = 96, reward: str | None = None) -> str:
    """One row per held-out prompt (the first ``max_prompts``, not picked): the prompt, the base model's
    images | the trained model's images for the same seeds, each upscaled (nearest) to ``size`` px with
    its reward below; the row's mean reward per side on the right. Returns ``path``."""
    prompts, base_paths, base_scores, reward = _evaluation(base_dir, reward)
    _, trained_paths, trained_scores, _ = _evaluation(trained_dir, reward)
    n, k = min(max_prompts, len(prompts)), min(images_per_side, base_scores.shape[1])
    font, small, title = _font(14), _font(12), _font(16)
    text_w, gap, pad, label_h, head_h, tail_w = 230, 24, 6, 16, 44, 150
    cell_w, cell_h = size + pad, size + label_h + pad
    side_w = k * cell_w
    width = text_w + 2 * side_w + gap + tail_w
    canvas = Image.new("RGB", (width, head_h + n * cell_h + 8), WHITE)
    draw = ImageDraw.Draw(canvas)
    x_base, x_trained = text_w, text_w + side_w + gap
    draw.text((x_base, 6), "base model", fill=BLACK, font=title)
    draw.text((x_trained, 6), "trained", fill=BLACK, font=title)
    draw.text((x_trained + side_w + 8, 6), "mean reward", fill=BLACK, font=title)
    draw.text((x_base, 26), f"same prompt and seed in both columns; number = {reward} reward", fill=GRAY, font=small)
    for i in range(n):
        y = head_h + i * cell_h
        draw.multiline_text((6, y + 4), "\n".join(textwrap.wrap(prompts[i], 26)), fill=BLACK, font=font)
        for x0, paths, scores in ((x_base, base_paths, base_scores), (x_trained, trained_paths, trained_scores)):
            for j in range(k):
                with fileio.open_file(paths[i][j], "rb") as f:
                    image = Image.open(f).convert("RGB")
                image = image.resize((size, size), Image.NEAREST)
                canvas.paste(image, (x0 + j * cell_w, y))
                draw.text((x0 + j * cell_w + 2, y + size + 1), f"{scores[i, j]:.2f}", fill=BLACK, font=small)
        before, after = (round(float(s[i, :k].mean()), 2) for s in (base_scores, trained_scores))
        color = GREEN if after > before else RED if after < before else BLACK
        draw.text((x_trained + side_w + 8, y + size // 2 - 8), f"{before:.2f} -> {after:.2f}", fill=color, font=font)
    with fileio.staged(path) as local:   # a bucket path: saved here, then copied up
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        canvas.save(local)
    return path


def eval_history(metrics_path: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every ``eval/<metric>`` row in a run's metrics.jsonl, by step (last write wins)."""
    points = {}
    with fileio.open_file(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            value = row.get(f"eval/{metric}")
            if value is not None:           # null: a non-finite value (metrics.jsonl is strict JSON)
                points[int(row["step"])] = float(value)
    return sorted(points.items())


def reward_curve(points: list[tuple[int, float]], path: str, *, base: float | None = None,
                 label: str = "held-out mean reward") -> str:
    """Held-out reward vs update (``points``), the base model as a dashed line. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o", label="trained (policy reported by the run)")
    if base is not None:
        ax.axhline(base, color="gray", ls="--", label=f"base model {base:.3f}")
    ax.set_xlabel("update")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.staged(path) as local:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        fig.savefig(local, dpi=110)
    plt.close(fig)
    return path
