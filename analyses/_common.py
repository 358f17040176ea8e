"""Helpers shared by the analysis scripts: which checkpoints to compare and their held-out metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tsds_interp.model import load
from tsds_interp.plotting import wrapped
from tsds_interp.rollout import progress
from tsds_interp.stats import seed_interval
from tsds_interp.verification import heldout_metrics

KEY_METRICS = ("p_s_first", "p_s", "p_d_given_c", "p_d_given_w", "realized_accuracy", "predicted_accuracy@3",
               "pass@3", "within_auc@1", "within_auc@2", "greedy_accuracy", "accept_gap_within")


def checkpoint_groups(labels: list[str], seed_runs: list[str] | None) -> dict[str, list[str]]:
    """label -> checkpoints, one per seed: shipped names by default, else ``RUN/label/checkpoint``."""
    if not seed_runs:
        return {label: [label] for label in labels}
    groups = {label: [str(Path(r) / label / "checkpoint") for r in seed_runs] for label in labels}
    missing = [c for cs in groups.values() for c in cs if not Path(c).is_dir()]
    if missing:
        raise ValueError(f"no checkpoint at {missing[0]}; train it or drop that run from --seed-runs")
    return groups


def each_model(groups: dict[str, list[str]]) -> list[tuple[str, int, str]]:
    """(label, seed, checkpoint) of every model of ``checkpoint_groups``, the seed being its index."""
    return [(label, seed, ckpt) for label, ckpts in groups.items() for seed, ckpt in enumerate(ckpts)]


def evaluate_groups(groups: dict[str, list[str]], n_questions: int, n_ood: int = 256) -> pd.DataFrame:
    """Held-out DS metrics of every checkpoint: tidy, with ``label`` and ``seed`` (its index)."""
    frames = []
    for label, seed, ckpt in progress(each_model(groups), "evaluating", "model"):
        df = heldout_metrics(load(ckpt), n_questions=n_questions, n_ood=n_ood)
        frames.append(df.assign(label=label, seed=seed, checkpoint=ckpt))
    return pd.concat(frames, ignore_index=True)


# Metrics confined to [0, 1] (proportions, accuracies, AUCs; the name before any "@k"): their
# intervals over seeds stay inside (as do those of the positive ratios and the cosines).
UNIT_METRICS = {"p_s_first", "p_s", "p_d_given_c", "p_d_given_w", "realized_accuracy", "predicted_accuracy", "pass",
                "malformed", "greedy_accuracy", "sample_accuracy", "slip_share", "within_auc", "own_logprob_auc",
                "corruption_auc", "e_plus", "e_minus", "episode_accuracy", "episode_malformed",
                "episode_accuracy_no_reflection", "decision_token_share"}
POSITIVE_METRICS = {"imbalance_index", "ratio_decision_to_sample"}


def metric_bounds(metric: str) -> tuple[float, float | None] | None:
    """The range a metric's values cannot leave (``None``: unbounded), by its name before any "@k"."""
    base = str(metric).split("@")[0]
    if base in UNIT_METRICS:
        return 0.0, 1.0
    if base in POSITIVE_METRICS:
        return 0.0, None
    return (-1.0, 1.0) if base == "cosine" else None


def over_seeds(df: pd.DataFrame, value: str = "value", keys=("label", "cell", "metric")) -> pd.DataFrame:
    """Mean over seeds with a 95% interval (``stats.seed_interval``: Student's t, on a scale that keeps
    each metric inside ``metric_bounds``, so a proportion's or AUC's interval stays in [0, 1]); with
    one seed, that seed's own interval (lo, hi). Values other than ``"value"`` (differences) are unbounded."""
    rows = []
    for key, part in df.groupby(list(keys), sort=False):
        v = part[value].to_numpy(float)
        k = len(v)
        if k > 1:
            metric = dict(zip(keys, key)).get("metric", "")
            lo, hi = seed_interval(v, metric_bounds(metric) if value == "value" else None)
        else:
            lo, hi = float(part["lo"].iloc[0]), float(part["hi"].iloc[0])
        rows.append({**dict(zip(keys, key)), "mean": v.mean(), "lo": lo, "hi": hi, "seeds": k})
    return pd.DataFrame(rows)


def fmt(mean: float, lo: float, hi: float) -> str:
    return "—" if np.isnan(mean) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def title_over_seeds(fig, agg: pd.DataFrame, what: str, questions: int) -> None:
    """A title over ``fig``, wrapped to its width, naming ``what`` is shown, the models, the seeds
    behind each point with their interval, and n."""
    k = int(agg.seeds.min())
    spread = (f"mean over {k} seeds with 95% intervals (t over seeds, kept in the metric's bounds)" if k > 1 else
              "one seed, 95% intervals over questions")
    title = f"{what}: {', '.join(agg.label.unique())}; {spread}; n = {questions} held-out questions per model"
    fig.suptitle(wrapped(title, fig.get_figwidth()), fontsize=9)


def cell_points(ax, agg: pd.DataFrame, metric: str, labels, cells: list[str]) -> None:
    """One metric per cell for several models: points with 95% interval bars, side by side."""
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        part = agg[(agg.metric == metric) & (agg.label == label)].set_index("cell").reindex(cells)
        x = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(cells))]
        yerr = np.clip([part["mean"] - part["lo"], part["hi"] - part["mean"]], 0, None)  # rounding
        ax.errorbar(x, part["mean"], yerr=yerr, fmt="o", label=label, capsize=2)
    ax.set_xticks(range(len(cells)), cells, rotation=45, fontsize=8)
    ax.set(title=metric, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
