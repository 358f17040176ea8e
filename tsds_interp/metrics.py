"""The DS decomposition of reflective rollouts, per difficulty cell and overall.

Per episode the model writes up to K candidates, each followed by a decision. With
``p = p_s`` (a candidate is correct), ``a = p_{d|C}`` (ACCEPT given correct) and
``r = p_{d|W}`` (REJECT given wrong), and attempts independent, an attempt stops the episode
with the right answer with probability ``p a``, with a wrong one with ``(1 - p)(1 - r)``, and goes
on with ``c = p (1 - a) + (1 - p) r``. Hence

- budget K (the K-th candidate is final whatever the decision): ``p a (1 - c^(K-1)) / (1 - c) + c^(K-1) p``
- unbounded: ``p a / (p a + (1 - p)(1 - r))``.

``p_s`` and the decision rates count every candidate written (decisions after the last attempt
included), ``p_s_first`` only the first. A decision that is neither ACCEPT nor REJECT counts as
neither (it ends the episode as malformed). ``pass@k`` is the share of episodes with a correct
candidate among their attempts. Proportions get Wilson 95% intervals; predicted accuracies get
a parametric-bootstrap 95% interval from the three counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tsds_interp import checks
from tsds_interp.rollout import ACCEPTED, NOT_REACHED, REJECTED, Rollouts, StepRollouts
from tsds_interp.stats import (
    Z95,
    percentile_interval,
    wilson,
)
from tsds_interp.task import (
    TaskConfig,
    num_digits,
)


def predicted_accuracy(p_s, p_dc, p_dw, budget: int | None):
    """Accuracy of the DS process from its three probabilities; ``budget=None`` is unbounded."""
    p_s, p_dc, p_dw = (np.asarray(x, float) for x in (p_s, p_dc, p_dw))
    for name, x in (("p_s", p_s), ("p_dc", p_dc), ("p_dw", p_dw)):
        if ((x < 0) | (x > 1)).any():  # nan (an undefined proportion) gives nan
            raise ValueError(f"{name} must be a probability in [0, 1], got {x.tolist()!r}")
    if budget is not None:
        checks.number("budget", budget, lo=1, hi=10**6, integer=True)
    stop_right = p_s * p_dc
    stop_wrong = (1 - p_s) * (1 - p_dw)
    if budget is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            return stop_right / (stop_right + stop_wrong)
    go_on = 1 - stop_right - stop_wrong
    acc = np.zeros_like(stop_right)
    for i in range(budget - 1):
        acc = acc + go_on**i * stop_right
    return acc + go_on ** (budget - 1) * p_s


def simulate_ds(p_s: float, p_dc: float, p_dw: float, budget: int, n: int, seed: int = 0
                ) -> np.ndarray:
    """Monte Carlo of the DS process: whether each of ``n`` episodes ends with a right answer."""
    for name, x in (("p_s", p_s), ("p_dc", p_dc), ("p_dw", p_dw)):
        checks.number(name, x, lo=0, hi=1)
    checks.number("budget", budget, lo=1, hi=10**6, integer=True)
    checks.number("n", n, lo=1, hi=10**9, integer=True)
    rng = np.random.default_rng(seed)
    result = np.zeros(n, bool)
    alive = np.ones(n, bool)
    for attempt in range(budget):
        right = rng.random(n) < p_s
        accept = np.where(right, rng.random(n) < p_dc, rng.random(n) >= p_dw)
        stop = alive & (accept | (attempt == budget - 1))
        result[stop] = right[stop]
        alive &= ~stop
    return result


def _counts(r: Rollouts) -> dict[str, np.ndarray]:
    written = np.arange(r.correct.shape[1]) < r.n_attempts.numpy()[:, None]
    correct = r.correct.numpy()
    dec = r.decisions.numpy()
    return {
        "first_correct": correct[:, 0],
        "cand": written.sum(1),
        "cand_correct": (correct & written).sum(1),
        "acc_given_c": ((dec == ACCEPTED) & correct).sum(1),
        "rej_given_w": ((dec == REJECTED) & written & ~correct).sum(1),
        "wrong": (written & ~correct).sum(1),
        "final": r.final_correct.numpy(),
        "any": (correct & written).any(1),
        "attempts": r.n_attempts.numpy(),
        "malformed": r.malformed.numpy(),
    }


def _bootstrap_predicted(c: dict, budget: int | None, n_boot: int, rng) -> tuple[float, float]:
    n_c, n_w, n_cand = c["cand_correct"], c["wrong"], c["cand"]
    if min(n_c, n_w) == 0 or n_cand == 0:
        return np.nan, np.nan
    p = rng.binomial(n_cand, n_c / n_cand, n_boot) / n_cand
    a = rng.binomial(n_c, c["acc_given_c"] / n_c, n_boot) / n_c
    w = rng.binomial(n_w, c["rej_given_w"] / n_w, n_boot) / n_w
    pred = predicted_accuracy(p, a, w, budget)
    return percentile_interval(pred)


def _cell_rows(cell: str, c: dict, budget: int, rng, n_boot: int) -> list[dict]:
    n = len(c["final"])
    tot = {k: int(np.sum(v)) for k, v in c.items()}
    props = {
        "p_s_first": (tot["first_correct"], n),
        "p_s": (tot["cand_correct"], tot["cand"]),
        "p_d_given_c": (tot["acc_given_c"], tot["cand_correct"]),
        "p_d_given_w": (tot["rej_given_w"], tot["wrong"]),
        "realized_accuracy": (tot["final"], n),
        f"pass@{budget}": (tot["any"], n),
        "malformed": (tot["malformed"], n),
    }
    rows = []
    for metric, (k, m) in props.items():
        lo, hi = wilson(k, m)
        rows.append(dict(cell=cell, metric=metric, value=k / m if m else np.nan,
                         lo=float(lo), hi=float(hi), n=m))
    p, a, w = (props[k][0] / props[k][1] if props[k][1] else np.nan
               for k in ("p_s", "p_d_given_c", "p_d_given_w"))
    for name, k_budget in ((f"predicted_accuracy@{budget}", budget), ("predicted_accuracy@inf", None)):
        lo, hi = _bootstrap_predicted(tot, k_budget, n_boot, rng)
        rows.append(dict(cell=cell, metric=name, value=float(predicted_accuracy(p, a, w, k_budget)),
                         lo=lo, hi=hi, n=tot["cand"]))
    att = c["attempts"].astype(float)
    sem = att.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
    rows.append(dict(cell=cell, metric="mean_attempts", value=att.mean(),
                     lo=att.mean() - Z95 * sem, hi=att.mean() + Z95 * sem, n=n))
    return rows


def ds_metrics(r: Rollouts, budget: int | None = None, n_boot: int = 2000, seed: int = 0
               ) -> pd.DataFrame:
    """Tidy DS metrics: one row per (cell, metric) with value, 95% CI (lo, hi) and count n.

    ``cell`` is ``"da x db"`` for each difficulty cell and ``"all"`` for the whole batch. Step-format
    rollouts get :func:`step_ds_metrics`.
    """
    if not isinstance(r, Rollouts | StepRollouts):
        raise ValueError(f"ds_metrics measures the Rollouts that tsds_interp.rollout.rollout returns, got "
                         f"{type(r).__name__}; for your own traces use tsds_interp.traces.ds_counts")
    if len(r) == 0:
        raise ValueError("no rollouts to measure; roll out at least one question")
    checks.number("n_boot", n_boot, lo=1, hi=10**6, integer=True)
    if isinstance(r, StepRollouts):
        return step_ds_metrics(r, budget, n_boot, seed)
    budget = budget or r.decisions.shape[1]
    counts = _counts(r)
    da, db = num_digits(r.a).numpy(), num_digits(r.b).numpy()
    rng = np.random.default_rng(seed)
    rows = []
    for cell in sorted(set(zip(da, db))):
        sel = (da == cell[0]) & (db == cell[1])
        rows += _cell_rows(TaskConfig.cell_name(cell), {k: v[sel] for k, v in counts.items()},
                           budget, rng, n_boot)
    rows += _cell_rows("all", counts, budget, rng, n_boot)
    return pd.DataFrame(rows)


def _call_counts(r: StepRollouts) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The counts :func:`_counts` gives for one-shot episodes, per call of step-format episodes (a
    call is a reflective episode over one state), with each call's episode and call index."""
    ep, call = r.episode.numpy(), r.call.numpy()
    key = ep * (int(call.max()) + 1) + call
    uniq, inv = np.unique(key, return_inverse=True)
    n = len(uniq)

    def add(x):
        return np.bincount(inv, weights=x.astype(float), minlength=n).astype(int)
    correct, dec = r.step_correct.numpy(), r.decisions.numpy()
    first = r.attempt.numpy() == 0
    written = np.ones_like(correct)
    bad = np.zeros(n, bool)
    bad[inv[(dec == NOT_REACHED) | (dec == -1)]] = True
    taken_correct = np.zeros(n, bool)
    taken_correct[inv[r.taken.numpy() & correct]] = True
    counts = {
        "first_correct": add(first & correct).astype(bool),
        "cand": add(written),
        "cand_correct": add(correct),
        "acc_given_c": add((dec == ACCEPTED) & correct),
        "rej_given_w": add((dec == REJECTED) & ~correct),
        "wrong": add(~correct),
        "final": taken_correct,
        "any": add(correct) > 0,
        "attempts": add(written),
        "malformed": bad,
    }
    owner = np.zeros(n, int)
    owner[inv] = ep
    index = np.zeros(n, int)
    index[inv] = call
    return counts, owner, index


def step_ds_metrics(r: StepRollouts, budget: int | None = None, n_boot: int = 2000, seed: int = 0
                    ) -> pd.DataFrame:
    """DS metrics of step-format rollouts, per cell of the question and ``all``.

    Step level (a call is a reflective episode over one state; the metrics of :func:`ds_metrics`):
    ``p_s_first``, ``p_s``, ``p_d_given_c``, ``p_d_given_w``, ``realized_accuracy`` (the taken step
    is right), ``pass@K``, ``predicted_accuracy@K`` / ``@inf``, ``mean_attempts``, and by call index
    ``p_s_first@call{k}``, ``p_d_given_c@call{k}``, ``p_d_given_w@call{k}``. Episode level:
    ``episode_accuracy`` (the final running sum is the product), ``episode_malformed``, ``mean_calls``.
    """
    budget = budget or r.budget
    counts, owner, index = _call_counts(r)
    da, db = num_digits(r.a).numpy(), num_digits(r.b).numpy()
    rng = np.random.default_rng(seed)
    cells = [(TaskConfig.cell_name(c), (da == c[0]) & (db == c[1])) for c in sorted(set(zip(da, db)))]
    rows = []
    for cell, sel in [*cells, ("all", np.ones(len(r), bool))]:
        calls = sel[owner]
        rows += _cell_rows(cell, {k: v[calls] for k, v in counts.items()}, budget, rng, n_boot)
        for k in range(int(index.max()) + 1):
            at = calls & (index == k)
            for metric, (hit, base) in {"p_s_first": (counts["first_correct"], np.ones(len(at), int)),
                                        "p_d_given_c": (counts["acc_given_c"], counts["cand_correct"]),
                                        "p_d_given_w": (counts["rej_given_w"], counts["wrong"])}.items():
                x, m = int(hit[at].sum()), int(base[at].sum())
                lo, hi = wilson(x, m)
                rows.append(dict(cell=cell, metric=f"{metric}@call{k + 1}", value=x / m if m else np.nan,
                                 lo=float(lo), hi=float(hi), n=m))
        n = int(sel.sum())
        for metric, hit in (("episode_accuracy", r.final_correct.numpy()[sel]),
                            ("episode_malformed", r.malformed.numpy()[sel])):
            lo, hi = wilson(int(hit.sum()), n)
            rows.append(dict(cell=cell, metric=metric, value=hit.mean(), lo=float(lo), hi=float(hi), n=n))
        calls_per = r.n_calls.numpy()[sel].astype(float)
        sem = calls_per.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
        rows.append(dict(cell=cell, metric="mean_calls", value=calls_per.mean(),
                         lo=calls_per.mean() - Z95 * sem, hi=calls_per.mean() + Z95 * sem, n=n))
    return pd.DataFrame(rows)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """Metrics as columns, cells as rows (values only), for printing."""
    return df.pivot(index="cell", columns="metric", values="value")[df.metric.unique()]


def _gain_parts(draws, budget: int, calls: float = 1.0):
    (p0, c0, w0), (p1, c1, w1) = draws

    def acc(p, c, w):
        return predicted_accuracy(p, c, w, budget) ** calls
    samp = (acc(p1, c0, w0) - acc(p0, c0, w0) + acc(p1, c1, w1) - acc(p0, c1, w1)) / 2
    dec = (acc(p0, c1, w1) - acc(p0, c0, w0) + acc(p1, c1, w1) - acc(p1, c0, w0)) / 2
    return samp + dec, samp, dec


def gain_decomposition(before: pd.DataFrame, after: pd.DataFrame, budget: int, n_boot: int = 2000,
                       seed: int = 0, level: str = "step") -> pd.DataFrame:
    """Split the predicted-accuracy gain from ``before`` to ``after`` (two :func:`ds_metrics`
    frames) into a sampling part and a decision part, per cell.

    With ``A(p_s, d)`` the predicted accuracy at budget K, ``d = (p_{d|C}, p_{d|W})``, the parts
    are the Shapley averages over both orders of swapping one model's numbers for the other's:
    ``sampling = [A(p1, d0) - A(p0, d0) + A(p1, d1) - A(p0, d1)] / 2`` and likewise for decision;
    they add up to ``A(p1, d1) - A(p0, d0)``. 95% intervals from a parametric bootstrap of the
    six proportions (their counts are the ``n`` column).

    ``level="episode"`` (step-format frames): the same split of the predicted *episode* accuracy
    ``A(p_s, d) ** m``, an episode being right when each of its ``m`` calls takes a right step, with
    ``m`` the cell's ``mean_calls`` averaged over the two models (calls treated as independent).
    """
    if level not in ("step", "episode"):
        raise ValueError(f"level must be 'step' or 'episode', got {level!r}")
    rng = np.random.default_rng(seed)
    keys = ("p_s", "p_d_given_c", "p_d_given_w")
    rows = []

    def has_all(f):
        return {c for c, part in f.groupby("cell") if set(keys) <= set(part.metric)}
    for cell in [c for c in after.cell.unique() if c in has_all(before) & has_all(after)]:
        vals = []
        for frame in (before, after):
            m = frame[frame.cell == cell].set_index("metric")
            vals.append([(float(m.loc[k, "value"]), int(m.loc[k, "n"])) for k in keys])
        if any(np.isnan(v) or n == 0 for model in vals for v, n in model):
            continue

        calls = 1.0
        if level == "episode":
            calls = np.mean([float(f[(f.cell == cell) & (f.metric == "mean_calls")].value.iloc[0])
                             for f in (before, after)])
        point = _gain_parts([[v for v, _ in model] for model in vals], budget, calls)
        boot = _gain_parts([[rng.binomial(n, v, n_boot) / n for v, n in model] for model in vals], budget, calls)
        for name, value, draws in zip(("total", "sampling", "decision"), point, boot):
            lo, hi = percentile_interval(draws)
            rows.append(dict(cell=cell, part=name, value=float(value), lo=float(lo), hi=float(hi), level=level))
    return pd.DataFrame(rows)
