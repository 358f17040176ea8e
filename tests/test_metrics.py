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


def test_bad_probabilities_budgets_and_inputs_are_refused_by_exact_message_at_their_bounds():
    assert predicted_accuracy(0, 0, 0, 1) == 0.0 and predicted_accuracy(1, 1, 1, 1) == 1.0
    assert np.isnan(predicted_accuracy(np.nan, 0.5, 0.5, 3))  # an undefined proportion stays undefined
    cases = [((1.5, 0.5, 0.5, 3), "p_s must be a probability in [0, 1], got 1.5"),
             ((-0.1, 0.5, 0.5, 3), "p_s must be a probability in [0, 1], got -0.1"),
             ((0.5, -0.1, 0.5, 3), "p_dc must be a probability in [0, 1], got -0.1"),
             ((0.5, 1.01, 0.5, 3), "p_dc must be a probability in [0, 1], got 1.01"),
             ((0.5, 0.5, [0.5, 2.0], 3), "p_dw must be a probability in [0, 1], got [0.5, 2.0]"),
             ((0.5, 0.5, 0.5, 0), "budget must be an integer in [1, 1000000], got 0"),
             ((0.5, 0.5, 0.5, 10**6 + 1), "budget must be an integer in [1, 1000000], got 1000001"),
             ((0.5, 0.5, 0.5, 2.5), "budget must be an integer in [1, 1000000], got 2.5")]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            predicted_accuracy(*args)
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        ds_metrics([1, 2])
    assert str(err.value) == ("ds_metrics measures the Rollouts that tsds_interp.rollout.rollout returns, got list; "
                              "for your own traces use tsds_interp.traces.ds_counts")
    for n_boot in (0, 10**6 + 1):
        with pytest.raises(ValueError) as err:
            ds_metrics(_constructed(), n_boot=n_boot)
        assert str(err.value) == f"n_boot must be an integer in [1, 1000000], got {n_boot}"
    assert len(ds_metrics(_constructed(), n_boot=1)) == len(ds_metrics(_constructed(), n_boot=2))


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


def test_every_proportion_row_carries_its_wilson_interval_and_count():
    df = ds_metrics(_constructed()).set_index(["cell", "metric"])
    for metric, (k, n) in {"p_s": (4, 10), "p_s_first": (2, 6), "p_d_given_c": (2, 4), "p_d_given_w": (3, 6),
                           "realized_accuracy": (3, 6), "pass@3": (4, 6), "malformed": (1, 6)}.items():
        lo, hi = wilson(k, n)
        row = df.loc[("1x1", metric)]
        assert (row.n, row.lo, row.hi) == pytest.approx((n, float(lo), float(hi))), metric


def test_predicted_accuracy_has_a_bootstrap_interval_around_it():
    df = ds_metrics(_constructed(), n_boot=4000, seed=3).set_index(["cell", "metric"])
    for name in ("predicted_accuracy@3", "predicted_accuracy@inf"):
        row = df.loc[("1x1", name)]
        assert row.n == 10  # candidates
        assert 0 <= row.lo < row.value < row.hi <= 1 and row.hi - row.lo > 0.1, (name, row.lo, row.hi)
    # the bootstrap draws p_s, p_d|C and p_d|W from their counts: its middle is near the point value
    again = ds_metrics(_constructed(), n_boot=4000, seed=4).set_index(["cell", "metric"])
    assert again.loc[("1x1", "predicted_accuracy@3"), "lo"] == pytest.approx(
        df.loc[("1x1", "predicted_accuracy@3"), "lo"], abs=0.05)


def test_no_wrong_candidate_leaves_predicted_accuracy_without_an_interval():
    r = _constructed()[[0]]  # one episode, its one candidate right
    row = ds_metrics(r).set_index(["cell", "metric"]).loc[("1x1", "predicted_accuracy@3")]
    assert np.isnan(row.lo) and np.isnan(row.hi)


def test_simulate_ds_defaults_and_extremes():
    assert np.array_equal(simulate_ds(0.4, 0.7, 0.6, 3, 500), simulate_ds(0.4, 0.7, 0.6, 3, 500, seed=0))
    out = simulate_ds(1.0, 1.0, 0.0, 2, 50)
    assert out.dtype == bool and out.all()
    assert not simulate_ds(0.0, 0.5, 0.5, 3, 50).any()


def test_cells_are_measured_apart_and_together():
    r = _constructed()
    r.a = torch.tensor([3, 3, 13, 13, 3, 3])    # episodes 0-1 and 4-5: 1x1 or 1x2; 2-3: 2x1 or 2x2
    r.b = torch.tensor([4, 14, 4, 14, 4, 4])
    df = ds_metrics(r).set_index(["cell", "metric"])
    cells = {c for c, _ in df.index}
    assert cells == {"1x1", "1x2", "2x1", "2x2", "all"}
    assert df.loc[("1x1", "realized_accuracy"), "n"] == 3 and df.loc[("all", "realized_accuracy"), "n"] == 6
    assert df.loc[("2x2", "p_s"), ["value", "n"]].tolist() == [1 / 3, 3]  # episode 3: R R then the right one
    assert df.loc[("all", "p_s"), "value"] == pytest.approx(0.4)
    assert ("all", "predicted_accuracy@3") in df.index  # the budget of the rollouts, for every cell


def test_mean_attempts_interval_and_defaults():
    df = ds_metrics(_constructed()).set_index(["cell", "metric"])
    att = np.array([1, 2, 1, 3, 2, 1], float)
    half = 1.959963984540054 * att.std(ddof=1) / np.sqrt(6)
    row = df.loc[("1x1", "mean_attempts")]
    assert (row.value, row.lo, row.hi, row.n) == pytest.approx((att.mean(), att.mean() - half, att.mean() + half, 6))
    assert ds_metrics(_constructed()).equals(ds_metrics(_constructed(), n_boot=2000, seed=0))  # the defaults
    assert not ds_metrics(_constructed(), seed=1).equals(ds_metrics(_constructed()))  # the seed is used


def test_gain_decomposition_rows_and_defaults():
    import pandas as pd

    from tsds_interp.metrics import gain_decomposition

    def frame(cell, p, c, w):
        return pd.DataFrame([dict(cell=cell, metric=m, value=v, n=300)
                             for m, v in (("p_s", p), ("p_d_given_c", c), ("p_d_given_w", w))])
    before = pd.concat([frame("2x2", 0.4, 0.8, 0.3), frame("3x3", 0.2, 0.7, 0.4)])
    after = pd.concat([frame("2x2", 0.6, 0.9, 0.5), frame("4x4", 0.5, 0.5, 0.5)])  # 4x4 only after, 3x3 only before
    df = gain_decomposition(before, after, budget=3)
    assert set(df.cell) == {"2x2"} and set(df.level) == {"step"} and set(df.part) == {"total", "sampling", "decision"}
    assert (df.lo < df.value).all() and (df.value < df.hi).all()
    assert df.equals(gain_decomposition(before, after, budget=3, n_boot=2000, seed=0))
    assert not df.equals(gain_decomposition(before, after, budget=3, seed=1))
    single = frame("2x2", 0.6, 0.9, 0.5).assign(n=[300, 1, 300])
    assert len(gain_decomposition(frame("2x2", 0.4, 0.8, 0.3), single, budget=3)) == 3  # n = 1 is still data


def test_step_metrics_on_hand_made_step_episodes():
    """Two step-format episodes, counted by hand. Episode 0 (3 x 12, cell 1x2): call 1 writes a wrong
    step (rejected) then a right one (accepted, taken); call 2 a right step (accepted); the product
    is reached. Episode 1 (25 x 4, cell 2x1): call 1 writes a wrong step and accepts it; wrong end."""
    from tsds_interp.metrics import step_ds_metrics
    from tsds_interp.rollout import StepRollouts

    zeros = torch.zeros(4, 5, dtype=torch.long)
    r = StepRollouts(a=torch.tensor([3, 25]), b=torch.tensor([12, 4]), final_value=torch.tensor([36, 7]),
                     final_correct=torch.tensor([True, False]), n_calls=torch.tensor([2, 1]),
                     malformed=torch.tensor([False, False]), episode=torch.tensor([0, 0, 0, 1]),
                     call=torch.tensor([0, 0, 1, 0]), attempt=torch.tensor([0, 1, 0, 0]), tokens=zeros, roles=zeros,
                     logprobs=zeros.float(), step_correct=torch.tensor([False, True, True, False]),
                     decisions=torch.tensor([REJECTED, ACCEPTED, ACCEPTED, ACCEPTED]),
                     taken=torch.tensor([False, True, True, True]), budget=2)
    df = step_ds_metrics(r, n_boot=200).set_index(["cell", "metric"])
    expected = {  # (cell, metric): (value, n)
        ("all", "p_s_first"): (1 / 3, 3),            # calls whose first step is right: e0 call 2
        ("all", "p_s"): (2 / 4, 4),                  # right steps among all written
        ("all", "p_d_given_c"): (1.0, 2),            # both right steps accepted
        ("all", "p_d_given_w"): (1 / 2, 2),          # of two wrong steps, one rejected
        ("all", "realized_accuracy"): (2 / 3, 3),    # taken steps that are right
        ("all", "pass@2"): (2 / 3, 3),
        ("all", "mean_attempts"): (4 / 3, 3),
        ("all", "p_s_first@call1"): (0.0, 2), ("all", "p_s_first@call2"): (1.0, 1),
        ("all", "p_d_given_w@call1"): (1 / 2, 2), ("all", "p_d_given_c@call2"): (1.0, 1),
        ("all", "episode_accuracy"): (1 / 2, 2), ("all", "episode_malformed"): (0.0, 2),
        ("all", "mean_calls"): (1.5, 2),
        ("1x2", "p_s_first"): (1 / 2, 2), ("1x2", "p_d_given_w"): (1.0, 1), ("1x2", "realized_accuracy"): (1.0, 2),
        ("1x2", "episode_accuracy"): (1.0, 1), ("1x2", "mean_calls"): (2.0, 1),
        ("2x1", "p_s_first"): (0.0, 1), ("2x1", "p_d_given_w"): (0.0, 1), ("2x1", "realized_accuracy"): (0.0, 1),
        ("2x1", "episode_accuracy"): (0.0, 1), ("2x1", "mean_calls"): (1.0, 1),
    }
    for key, (value, n) in expected.items():
        assert df.loc[key, "value"] == pytest.approx(value) and df.loc[key, "n"] == n, key
    for key in (("all", "p_d_given_w@call2"), ("2x1", "p_d_given_c"), ("2x1", "p_s_first@call2")):
        assert np.isnan(df.loc[key, "value"]) and df.loc[key, "n"] == 0, key  # nothing to count
    assert tuple(df.loc[("all", "p_d_given_w@call1"), ["lo", "hi"]]) == pytest.approx(wilson(1, 2))
    assert tuple(df.loc[("all", "episode_accuracy"), ["lo", "hi"]]) == pytest.approx(wilson(1, 2))
    sem = np.std([2, 1], ddof=1) / np.sqrt(2)
    assert tuple(df.loc[("all", "mean_calls"), ["lo", "hi"]]) == pytest.approx((1.5 - 1.96 * sem, 1.5 + 1.96 * sem),
                                                                               abs=1e-3)
    assert np.isnan(df.loc[("1x2", "mean_calls"), "lo"])  # one episode: no interval
    assert list(df.index.get_level_values(0).unique()) == ["1x2", "2x1", "all"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(p_s=1.5), "p_s must be a finite number in [0, 1], got 1.5"),
    (dict(p_dc=-0.1), "p_dc must be a finite number in [0, 1], got -0.1"),
    (dict(p_dw=float("nan")), "p_dw must be a finite number in [0, 1], got nan"),
    (dict(budget=0), "budget must be an integer in [1, 1000000], got 0"),
    (dict(budget=2.5), "budget must be an integer in [1, 1000000], got 2.5"),
    (dict(budget=10**6 + 1), "budget must be an integer in [1, 1000000], got 1000001"),
    (dict(n=0), "n must be an integer in [1, 1000000000], got 0"),
    (dict(n=1.5), "n must be an integer in [1, 1000000000], got 1.5"),
])
def test_simulate_ds_names_the_bad_argument_and_its_range(kwargs, message):
    args = dict(p_s=0.5, p_dc=0.5, p_dw=0.5, budget=2, n=10) | kwargs
    with pytest.raises(ValueError) as e:
        simulate_ds(**args)
    assert str(e.value) == message
    assert simulate_ds(1, 1, 0, 1, 3).all() and not simulate_ds(0, 1, 0, 2, 3).any()  # the bounds are allowed


def test_step_metrics_count_a_malformed_step_as_a_malformed_call():
    """Episode 0 takes one right step (accepted); episode 1's first step is malformed (its decision
    never reached): half the calls and half the episodes are malformed."""
    from tsds_interp.metrics import step_ds_metrics
    from tsds_interp.rollout import StepRollouts

    zeros = torch.zeros(2, 5, dtype=torch.long)
    r = StepRollouts(a=torch.tensor([3, 4]), b=torch.tensor([2, 2]), final_value=torch.tensor([6, -1]),
                     final_correct=torch.tensor([True, False]), n_calls=torch.tensor([1, 1]),
                     malformed=torch.tensor([False, True]), episode=torch.tensor([0, 1]), call=torch.tensor([0, 0]),
                     attempt=torch.tensor([0, 0]), tokens=zeros, roles=zeros, logprobs=zeros.float(),
                     step_correct=torch.tensor([True, False]), decisions=torch.tensor([ACCEPTED, NOT_REACHED]),
                     taken=torch.tensor([True, True]), budget=2)
    df = step_ds_metrics(r, n_boot=50).set_index(["cell", "metric"])
    for metric, value in (("malformed", 0.5), ("episode_malformed", 0.5), ("p_s_first", 0.5),
                          ("realized_accuracy", 0.5), ("episode_accuracy", 0.5)):
        assert df.loc[("all", metric), "value"] == pytest.approx(value) and df.loc[("all", metric), "n"] == 2, metric
