"""Seaborn figures shared by the CLIs, analyses and notebooks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def heatmap(df: pd.DataFrame, rows: str, cols: str, path: str | Path, title: str,
            value: str = "value", annot: bool = True, label: str | None = None) -> Path:
    """Annotated diverging heatmap of ``value`` over ``rows`` x ``cols`` (summed if repeated), centred
    at 0; ``label`` names the colour bar (default: ``value``)."""
    table = df.pivot_table(index=rows, columns=cols, values=value, aggfunc="sum")
    width = max(4.0, 0.45 * table.shape[1] + 2)
    fig, ax = plt.subplots(figsize=(width, max(3.0, 0.5 * table.shape[0] + 1.5)))
    lim = float(table.abs().max().max()) or 1.0
    sns.heatmap(table, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim,
                annot=annot and table.size <= 400, fmt=".2f", annot_kws={"size": 7},
                cbar_kws={"label": label or value})
    ax.set_title(wrapped(title, 0.8 * width), fontsize=9)  # the colour bar takes the rest
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def wrapped(title: str, inches: float, points: float = 9) -> str:
    """``title`` with each line wrapped to fit a figure ``inches`` wide at ``points`` (no clipped text)."""
    chars = max(20, int(inches * 72 / (0.55 * points)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in title.split("\n"))


def auc_panels(df: pd.DataFrame, rows: str, cols: str, path: str | Path, title: str, value: str = "probe_auc",
               control: str | None = None) -> Path:
    """One heatmap of an AUC per ``cell`` of ``df`` (all cells first), on the AUC's own scale: 0 to 1
    centred at chance (0.5); each panel's title gives the cell and the largest ``n`` behind it, and
    the ``control`` column (one that must score chance) is labelled as such."""
    cells = ["all"] + sorted(c for c in df.cell.unique() if c != "all")
    fig, axes = plt.subplots(1, len(cells), figsize=(2.2 * len(cells) + 1.5, 3.6), squeeze=False, sharey=True)
    for i, (ax, cell) in enumerate(zip(axes[0], cells)):
        part = df[df.cell == cell]
        table = part.pivot_table(index=rows, columns=cols, values=value, aggfunc="mean")
        if control in table.columns:
            table = table.rename(columns={control: f"{control}\n(control)"})
        sns.heatmap(table, ax=ax, cmap="RdBu_r", center=0.5, vmin=0, vmax=1, annot=table.size <= 60, fmt=".2f",
                    annot_kws={"size": 6}, cbar=i == len(cells) - 1, cbar_kws={"label": "within-question AUC"})
        ax.set_title(f"{cell} (n={int(part['n'].max()) if len(part) else 0})", fontsize=8)
        ax.tick_params(labelsize=7)
        if i:
            ax.set_ylabel("")
    fig.suptitle(wrapped(title, fig.get_figwidth()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def gradient_mass_bars(summary: pd.DataFrame, path: str | Path, title: str = "Gradient mass by role") -> Path:
    """Per objective, on a linear 0-1 scale: the decision tokens' share of the gradient mass
    ``|g_d| / (|g_s| + |g_d|)`` (bar) beside their share of the tokens (black tick), so that the
    imbalance index (written on top) is the bar over the tick; the norms themselves are in the table."""
    fig, ax = plt.subplots(figsize=(1.3 * len(summary) + 2.5, 4))
    x = range(len(summary))
    ax.bar(x, summary["decision_mass_share"], color="#dd8452", label="decision share of gradient mass")
    ax.scatter(x, summary["decision_token_share"], marker="_", s=900, color="black", zorder=3,
               label="decision share of tokens")
    for i, v in enumerate(summary["imbalance_index"]):
        ax.annotate(f"I={v:.2f}", (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), summary["objective"], rotation=20)
    ax.set(ylim=(0, 1), ylabel="share", xlabel="I: imbalance index = decision share of mass / decision share of tokens")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.set_title(wrapped(title, fig.get_figwidth(), 12), pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def head_share_heatmap(shares: pd.DataFrame, path: str | Path,
                       title: str = "decision share |g_d| / (|g_s| + |g_d|) per head") -> Path:
    """One layer x head panel per objective of the decision share of that head's gradient."""
    objectives = list(dict.fromkeys(shares["objective"]))
    fig, axes = plt.subplots(1, len(objectives), figsize=(3.2 * len(objectives), 3.2), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        table = shares[shares.objective == objective].pivot(index="layer", columns="head", values="decision_share")
        sns.heatmap(table, ax=ax, cmap="viridis", vmin=0, vmax=1, annot=True, fmt=".2f",
                    cbar=objective == objectives[-1], cbar_kws={"label": "decision share"}, annot_kws={"size": 7})
        ax.set_title(objective, fontsize=9)
    fig.suptitle(wrapped(title, fig.get_figwidth()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _interval_bars(rows: pd.DataFrame) -> list[pd.Series]:
    """Error-bar lengths below and above ``value`` from ``lo`` / ``hi`` (0 where missing or rounded away)."""
    return [(rows.value - rows.lo).clip(lower=0).fillna(0), (rows.hi - rows.value).clip(lower=0).fillna(0)]


def verification_plot(df: pd.DataFrame, path: str | Path, title: str = "Does the decision verify?") -> Path:
    """Three panels from :func:`tsds_interp.metrics.verification_metrics`: within- vs between-question
    AUC per cell (with 95% intervals), the accept gap split into difficulty and within-question
    parts, and p_{d|C} / p_{d|W} by attempt on the hard cells."""
    cells = [c for c in df.cell.unique() if c not in ("hard", "all")] + [c for c in ("hard", "all")
                                                                        if c in set(df.cell)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = "e_plus@1" in set(df.metric)
    panels = ((("within_auc@1", "own_logprob_auc"), "within-state AUC (0.5 = ignores the step)"),
              (("e_plus@1", "e_minus@1"), "first-attempt error rate"),
              (("episode_accuracy", "episode_accuracy_no_reflection"), "episode accuracy")) if steps else (
              (("within_auc@1", "between_auc"), "AUC (0.5 = ignores candidate)"),
              (("accept_gap_difficulty", "accept_gap_within"), "P(ACCEPT) gap"))
    for ax, (metrics, ylabel) in zip(axes, panels):
        part = df[df.metric.isin(metrics)]
        for i, metric in enumerate(metrics):
            rows = part[part.metric == metric].set_index("cell").reindex(cells)
            x = [j + (i - 0.5) * 0.38 for j in range(len(cells))]
            ax.bar(x, rows.value, width=0.38, yerr=_interval_bars(rows), capsize=2, label=metric)
        ax.set_xticks(range(len(cells)), cells, rotation=45)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    if steps:
        return _save(fig, path, title)
    group = "hard" if "hard" in set(df.cell) else "all"
    att = df[(df.cell == group) & df.metric.str.match(r"p_d_given_[cw]@")].copy()
    att["attempt"] = att.metric.str.split("@").str[1]
    att["rate"] = att.metric.str.split("@").str[0]
    for i, (rate, part) in enumerate(att.groupby("rate")):
        x = part.attempt.astype(int) + (i - 0.5) * 0.15
        axes[2].errorbar(x, part.value, yerr=_interval_bars(part), fmt="o", capsize=3, label=rate)
    axes[2].set_xlabel("attempt")
    axes[2].set_xticks(sorted(att.attempt.astype(int).unique()))
    axes[2].legend(fontsize=8)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_title(f"decision rates by attempt ({group} cells)")
    return _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> Path:
    fig.suptitle(wrapped(title, fig.get_figwidth(), 12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
