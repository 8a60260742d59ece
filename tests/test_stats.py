"""Paired comparison with bootstrap intervals (jaxpref.stats): coverage at the nominal rate on synthetic scores
with a known difference, widths against normal theory, ties, and the training table that shows them."""
import math

import numpy as np
import pytest

from jaxpref import evaluate as ev
from jaxpref import stats


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _synthetic(seed: int, n: int = 200, k: int = 5, delta: float = 0.3):
    """Paired scores [n, k]: a prompt effect shared by both models, A shifted by delta, unit image noise. The
    per-prompt difference is N(delta, 2/k), so the true win probability is Phi(delta / sqrt(2/k))."""
    rng = np.random.default_rng(seed)
    prompt = 2.0 * rng.normal(size=(n, 1))
    a = prompt + delta + rng.normal(size=(n, k))
    b = prompt + rng.normal(size=(n, k))
    return a, b, delta, _normal_cdf(delta / math.sqrt(2.0 / k))


def test_intervals_cover_the_known_difference_at_the_nominal_rate():
    covered = np.zeros(2, int)
    for seed in range(100):
        a, b, delta, p_win = _synthetic(seed)
        c = stats.paired_comparison(a, b, num_resamples=1000, seed=seed)
        covered += [c["mean_diff_ci"][0] <= delta <= c["mean_diff_ci"][1],
                    c["win_rate_ci"][0] <= p_win <= c["win_rate_ci"][1]]
    assert covered[0] >= 90 and covered[1] >= 90, covered   # 95 % nominal


def test_interval_widths_match_normal_theory():
    a, b, delta, p_win = _synthetic(0, n=2000)
    c = stats.paired_comparison(a, b, num_resamples=4000)
    d = stats.prompt_means(a) - stats.prompt_means(b)
    half = 1.959964 * d.std() / math.sqrt(len(d))
    assert (c["mean_diff_ci"][1] - c["mean_diff_ci"][0]) / 2 == pytest.approx(half, rel=0.1)
    assert c["mean_diff_ci"][0] < c["mean_diff"] < c["mean_diff_ci"][1]
    w = c["win_rate"]
    assert (c["win_rate_ci"][1] - c["win_rate_ci"][0]) / 2 == pytest.approx(1.959964 * math.sqrt(w * (1 - w) / 2000),
                                                                         rel=0.1)
    assert abs(c["mean_diff"] - delta) < 3 * half and abs(w - p_win) < 0.05


def test_identical_pair_ties_everywhere():
    a = np.random.default_rng(1).normal(size=(50, 3))
    c = stats.paired_comparison(a, a.copy())
    assert c["win_rate"] == 0.5 and c["win_rate_ci"] == [0.5, 0.5]
    assert c["ties"] == 1.0 and c["wins"] == 0.0
    assert c["mean_diff"] == 0.0 and c["mean_diff_ci"] == [0.0, 0.0]


def test_ties_count_half_and_prompt_means():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 4.0])   # win, tie, loss, tie
    c = stats.paired_comparison(a, b)
    assert (c["win_rate"], c["wins"], c["ties"], c["n_prompts"]) == (0.5, 0.25, 0.5, 4)
    assert stats.paired_comparison(a + 10, b)["win_rate_ci"] == [1.0, 1.0]
    # [N, K]: each prompt's mean first (prompt 0: 2 vs 1.5 wins; prompt 1: 1 vs 1 ties).
    c = stats.paired_comparison([[1.0, 3.0], [0.0, 2.0]], [[1.0, 2.0], [1.0, 1.0]])
    assert c["win_rate"] == 0.75 and c["mean_diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same prompt set"):
        stats.paired_comparison(a, b[:3])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_comparison(a, b, confidence=95)


def test_bootstrap_means_are_means_of_resampled_rows():
    """The counting shortcut against plain resampling with the same draws."""
    columns = np.random.default_rng(2).normal(size=(37, 2))
    got = stats.bootstrap_means(columns, num_resamples=1200, seed=7)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.integers(0, 37, size=(r, 37)) for r in (500, 500, 200)])
    np.testing.assert_allclose(got, np.stack([columns[r].mean(axis=0) for r in rows]), rtol=1e-12, atol=1e-12)
    # Deterministic for a seed, different for another.
    assert np.array_equal(got, stats.bootstrap_means(columns, num_resamples=1200, seed=7))
    assert not np.array_equal(got, stats.bootstrap_means(columns, num_resamples=1200, seed=8))


def test_training_table_shows_the_intervals(capsys):
    base_scores = np.linspace(0.4, 0.7, 40).reshape(20, 2)
    trained_scores = base_scores + np.where(np.arange(20) % 4 == 0, -0.02, 0.06)[:, None]
    comp = {"shapes": ev.compare(trained_scores, base_scores)}
    trained = ev.flat_metrics(ev.summarize({"shapes": trained_scores}), comp)
    base = ev.flat_metrics(ev.summarize({"shapes": base_scores}))
    c = comp["shapes"]
    assert trained["shapes/mean_diff"] == pytest.approx(0.75 * 0.06 - 0.25 * 0.02)
    assert (trained["shapes/win_rate_ci_low"], trained["shapes/win_rate_ci_high"]) == tuple(c["win_rate_ci"])
    assert trained["shapes/mean_diff_ci_low"] < trained["shapes/mean_diff"] < trained["shapes/mean_diff_ci_high"]
    ev.print_report(base, trained, "/w")
    out = capsys.readouterr().out
    low, high = c["mean_diff_ci"]
    assert f"+{c['mean_diff']:.3f} [+{low:.3f}, +{high:.3f}]" in out
    assert f"0.750   [{c['win_rate_ci'][0]:.2f}, {c['win_rate_ci'][1]:.2f}]" in out
    assert "| shapes |" in ev.markdown_table(ev.summarize({"shapes": trained_scores}), comp)
