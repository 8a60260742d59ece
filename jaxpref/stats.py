"""Paired comparison of two models on the same prompts and seeds, with bootstrap confidence intervals.

The unit is the prompt: a prompt's K images share its text (and, between the two models, their seeds), so
they are not independent draws, and the papers' win rates are per prompt. Each prompt contributes its
mean score under A and under B; from those, the mean difference (A - B) and the win indicator (1 when A's
mean is higher, 1/2 on a tie, 0 otherwise), whose mean is the win rate. Their intervals are percentile
bootstrap intervals (Efron): prompts resampled with replacement, each keeping its A/B pair, the statistic
recomputed per resample, the interval the central ``confidence`` mass of those. An identical pair ties on
every prompt: win rate exactly 1/2 and a zero-width interval at 1/2.
"""
from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 10_000
_CHUNK = 500   # resamples drawn at once: keeps the index array at 500 x N


def prompt_means(scores) -> np.ndarray:
    """[N] or [N, K] scores -> [N] float64: each prompt's mean over its K images."""
    s = np.asarray(scores, np.float64)
    if s.ndim == 0 or s.shape[0] == 0:
        raise ValueError(f"scores of shape {s.shape}: expected [N] or [N, K] with N >= 1 prompts")
    return s.reshape(s.shape[0], -1).mean(axis=1)


def win_indicator(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where a > b, 1/2 where a == b, 0 where a < b."""
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def bootstrap_means(columns: np.ndarray, *, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> np.ndarray:
    """columns [N, C] -> [num_resamples, C]: the column means of ``num_resamples`` resamples of the N rows
    (rows drawn with replacement, the same rows for every column, so paired columns stay paired)."""
    columns = np.asarray(columns, np.float64)
    n = columns.shape[0]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, num_resamples, _CHUNK):
        r = min(_CHUNK, num_resamples - start)
        rows = rng.integers(0, n, size=(r, n))
        # How often each row was drawn in each resample; the resample means are then one matrix product.
        counts = np.bincount((rows + n * np.arange(r)[:, None]).ravel(), minlength=r * n).reshape(r, n)
        out.append(counts @ columns / n)
    return np.concatenate(out)


def percentile_interval(resampled: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """[R, C] resampled statistics -> [C, 2] (low, high): their central ``confidence`` quantiles."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}; expected a fraction in (0, 1), e.g. 0.95")
    tail = (1.0 - confidence) / 2.0
    return np.quantile(resampled, [tail, 1.0 - tail], axis=0).T


def paired_comparison(scores_a, scores_b, *, confidence: float = CONFIDENCE, num_resamples: int = NUM_RESAMPLES,
                      seed: int = 0) -> dict:
    """A against B on the same N prompts in the same order (scores [N] or [N, K] each).

    Returns {"win_rate", "wins", "ties", "n_prompts", "mean_a", "mean_b", "mean_diff" (A - B),
    "mean_diff_ci": [low, high], "win_rate_ci": [low, high], "confidence", "num_resamples"}; the
    intervals are deterministic for a given ``seed``.
    """
    a, b = prompt_means(scores_a), prompt_means(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"compare: {a.shape[0]} prompts vs {b.shape[0]}; evaluate both on the same prompt set")
    diff, win = a - b, win_indicator(a, b)
    (diff_ci, win_ci) = percentile_interval(
        bootstrap_means(np.stack([diff, win], axis=1), num_resamples=num_resamples, seed=seed), confidence)
    return {"win_rate": float(win.mean()), "wins": float(np.mean(a > b)), "ties": float(np.mean(a == b)),
            "n_prompts": int(a.shape[0]), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": float(diff.mean()), "mean_diff_ci": [float(x) for x in diff_ci],
            "win_rate_ci": [float(x) for x in win_ci], "confidence": float(confidence),
            "num_resamples": int(num_resamples)}
