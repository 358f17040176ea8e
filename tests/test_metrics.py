import numpy as np
import pytest
import torch

from tsds_interp.metrics import ds_metrics, predicted_accuracy, simulate_ds
from tsds_interp.rollout import ACCEPTED, INVALID, NOT_REACHED, REJECTED, Rollouts
from tsds_interp.stats import wilson

A, R, N, X = ACCEPTED, REJECTED, NOT_REACHED, INVALID


def _constructed() -> Rollouts:
    """Six 1x1 episodes with budget 3, written by hand (c = candidate correct)."""
    correct = [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]]
    decisions = [[A, N, N], [R, A, N], [A, N, N], [R, R, R], [R, A, N], [X, N, N]]
    n_attempts = [1, 2, 1, 3, 2, 1]
    final = [1, 1, 0, 1, 0, 0]
    n = len(correct)
    return Rollouts(
        a=torch.full((n,), 3), b=torch.full((n,), 4), tokens=torch.zeros(n, 5, dtype=torch.long),
        roles=torch.zeros(n, 5, dtype=torch.long), logprobs=torch.zeros(n, 5),
        candidates=torch.zeros(n, 3, 2, dtype=torch.long), values=torch.zeros(n, 3, dtype=torch.long),
        correct=torch.tensor(correct, dtype=torch.bool), decisions=torch.tensor(decisions),
        n_attempts=torch.tensor(n_attempts), malformed=torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.bool),
        final_correct=torch.tensor(final, dtype=torch.bool))


def test_metrics_match_hand_computation():
    df = ds_metrics(_constructed()).set_index(["cell", "metric"])["value"]
    # candidates written: 1+2+1+3+2+1 = 10; correct: 1+1+0+1+1+0 = 4
    assert df["1x1", "p_s"] == pytest.approx(4 / 10)
    assert df["1x1", "p_s_first"] == pytest.approx(2 / 6)
    # accepted given correct: ep0 (A), ep1 attempt 2 (A), ep3 attempt 3 (R), ep4 attempt 1 (R) -> 2/4
    assert df["1x1", "p_d_given_c"] == pytest.approx(2 / 4)
    # rejected given wrong: wrong candidates ep1a1 R, ep2a1 A, ep3a1 R, ep3a2 R, ep4a2 A, ep5a1 X -> 3/6
    assert df["1x1", "p_d_given_w"] == pytest.approx(3 / 6)
    assert df["1x1", "realized_accuracy"] == pytest.approx(3 / 6)
    assert df["1x1", "pass@3"] == pytest.approx(4 / 6)
    assert df["1x1", "mean_attempts"] == pytest.approx(10 / 6)
    assert df["1x1", "malformed"] == pytest.approx(1 / 6)
    expected = predicted_accuracy(0.4, 0.5, 0.5, 3)
    assert df["1x1", "predicted_accuracy@3"] == pytest.approx(float(expected))
    assert df["all", "p_s"] == df["1x1", "p_s"]


def test_predicted_accuracy_closed_forms():
    # never reject: the first candidate is final
    assert predicted_accuracy(0.3, 1.0, 0.0, 5) == pytest.approx(0.3)
    # perfect verifier with budget K: 1 - (1-p)^K
    assert predicted_accuracy(0.3, 1.0, 1.0, 4) == pytest.approx(1 - 0.7**4)
    # unbounded formula from SCIENCE.md
    p, a, r = 0.4, 0.8, 0.6
    assert predicted_accuracy(p, a, r, None) == pytest.approx(p * a / (p * a + (1 - p) * (1 - r)))
    # large budget converges to the unbounded value
    assert predicted_accuracy(p, a, r, 200) == pytest.approx(predicted_accuracy(p, a, r, None))


@pytest.mark.parametrize("p,a,r,k", [(0.3, 0.9, 0.5, 3), (0.6, 0.7, 0.2, 2), (0.1, 0.95, 0.9, 5),
                                     (0.5, 0.5, 0.5, 1)])
def test_predicted_accuracy_matches_monte_carlo(p, a, r, k):
    n = 200_000
    sim = simulate_ds(p, a, r, k, n, seed=1)
    lo, hi = wilson(sim.sum(), n)
    assert lo <= predicted_accuracy(p, a, r, k) <= hi


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson(0, 0)
    assert np.isnan(lo) and np.isnan(hi)


def test_metrics_have_intervals_and_counts():
    df = ds_metrics(_constructed())
    assert {"cell", "metric", "value", "lo", "hi", "n"} <= set(df.columns)
    ok = df.dropna(subset=["lo"])
    assert ((ok.lo <= ok.value + 1e-12) & (ok.value <= ok.hi + 1e-12)).all()


def test_empty_rollouts_error():
    with pytest.raises(ValueError, match="no rollouts"):
        ds_metrics(_constructed()[:0])


def test_gain_decomposition_adds_up_and_isolates_each_part():
    import pandas as pd

    from tsds_interp.metrics import gain_decomposition

    def frame(p, c, w):
        return pd.DataFrame([dict(cell="2x2", metric=m, value=v, n=400)
                             for m, v in (("p_s", p), ("p_d_given_c", c), ("p_d_given_w", w))])

    base = frame(0.4, 0.8, 0.3)
    only_decision = gain_decomposition(base, frame(0.4, 0.8, 0.7), budget=3).set_index("part")
    assert only_decision.loc["sampling", "value"] == pytest.approx(0.0, abs=1e-12)
    expected = float(predicted_accuracy(0.4, 0.8, 0.7, 3) - predicted_accuracy(0.4, 0.8, 0.3, 3))
    assert only_decision.loc["decision", "value"] == pytest.approx(expected)
    both = gain_decomposition(base, frame(0.6, 0.9, 0.5), budget=3).set_index("part")
    assert both.loc["sampling", "value"] + both.loc["decision", "value"] == pytest.approx(both.loc["total", "value"])
    assert both.loc["total", "lo"] < both.loc["total", "value"] < both.loc["total", "hi"]
    calls = pd.DataFrame([dict(cell="2x2", metric="mean_calls", value=m, n=400) for m in (2.0,)])
    ep = gain_decomposition(pd.concat([base, calls]), pd.concat([frame(0.6, 0.9, 0.5), calls.assign(value=3.0)]),
                            budget=3, level="episode").set_index("part")
    a0, a1 = (float(predicted_accuracy(*x, 3)) for x in ((0.4, 0.8, 0.3), (0.6, 0.9, 0.5)))
    assert ep.loc["total", "value"] == pytest.approx(a1**2.5 - a0**2.5)  # calls: the two models' mean
    assert ep.loc["sampling", "value"] + ep.loc["decision", "value"] == pytest.approx(ep.loc["total", "value"])
    with pytest.raises(ValueError, match="level"):
        gain_decomposition(base, base, budget=3, level="call")
