import numpy as np
import pytest

from tsds_interp import stats


def test_within_auc_counts_wins_and_half_ties_with_one_rule():
    truth = np.array([1.0, 0.0, 2.0])
    wrong = [np.array([0.0, 2.0]), np.array([0.0 + 1e-9, -1.0]), np.array([2.0 * (1 + 1e-7)])]
    assert stats.within_auc(truth, wrong).tolist() == [0.5, 0.75, 0.5]  # rounding-level differences tie
    assert stats.mean_gap(truth, wrong).tolist() == pytest.approx([0.0, 0.5, -2e-7])


def test_between_auc_equals_the_brute_force_count_over_other_questions():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 7).astype(float)
    wrong = [rng.integers(0, 4, rng.integers(1, 4)).astype(float) for _ in range(7)]
    wins = [stats.above(truth[j], w) for i, ws in enumerate(wrong) for w in ws for j in range(7) if j != i]
    assert stats.between_auc(truth, wrong) == pytest.approx(np.mean(wins))
    assert np.isnan(stats.between_auc(truth[:1], wrong[:1]))


def test_intervals_cover_their_estimate_and_are_nan_when_empty():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    m, lo, hi = stats.boot_mean(x, rng, 500)
    assert lo < m < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)
    assert all(np.isnan(stats.boot_mean(np.array([]), rng, 10)))
    assert all(np.isnan(stats.boot_ratio(np.zeros(3), np.zeros(3), rng, 10)))
    d, lo, hi = stats.proportion_difference(0.5, 100, 0.6, 100)
    assert d == pytest.approx(0.1) and hi - d == pytest.approx(1.959964 * np.sqrt(0.0049), rel=1e-5)
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0, abs=1e-12) and 0.25 < hi < 0.35


def test_seed_interval_is_students_t_and_stays_inside_bounds():
    from scipy import stats as scipy_stats

    from tsds_interp.stats import seed_interval

    v = np.array([0.9, 0.95, 0.93])
    half = scipy_stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
    assert np.allclose(seed_interval(v), (v.mean() - half, v.mean() + half))
    for values, bounds in [([0.92, 1.0, 1.0], (0, 1)), ([0.0, 0.0, 0.28], (0, 1)), ([0.1, 3.0, 6.0], (0, None)),
                           ([-0.99, -0.5, 0.2], (-1, 1))]:
        lo, hi = seed_interval(np.array(values), bounds)
        assert bounds[0] <= lo <= np.mean(values) <= hi and (bounds[1] is None or hi <= bounds[1]), (values, lo, hi)
        t_lo, t_hi = seed_interval(np.array(values))
        assert t_lo < bounds[0] or (bounds[1] is not None and t_hi > bounds[1])  # the case the bounds are for
    assert np.isnan(seed_interval(np.array([0.5]))).all()
