"""Seaborn figures shared by the CLIs, analyses and notebooks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def heatmap(df: pd.DataFrame, rows: str, cols: str, path: str | Path, title: str,
            value: str = "value", annot: bool = True) -> Path:
    """Annotated diverging heatmap of ``value`` over ``rows`` x ``cols`` (summed if repeated)."""
    table = df.pivot_table(index=rows, columns=cols, values=value, aggfunc="sum")
    width = max(4.0, 0.45 * table.shape[1] + 2)
    fig, ax = plt.subplots(figsize=(width, max(3.0, 0.5 * table.shape[0] + 1.5)))
    lim = float(table.abs().max().max()) or 1.0
    sns.heatmap(table, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim,
                annot=annot and table.size <= 400, fmt=".2f", annot_kws={"size": 7})
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def gradient_mass_bars(summary: pd.DataFrame, path: str | Path, title: str = "Gradient mass by role") -> Path:
    """Grouped bars of |g_sample| and |g_decision| per objective (log scale), imbalance index on top."""
    long = summary.melt(id_vars="objective", value_vars=["norm_sample", "norm_decision"],
                        var_name="role", value_name="gradient norm")
    long["role"] = long["role"].str.removeprefix("norm_")
    fig, ax = plt.subplots(figsize=(1.4 * len(summary) + 2.5, 4))
    sns.barplot(long, x="objective", y="gradient norm", hue="role", ax=ax, palette=["#4c72b0", "#dd8452"])
    ax.set_yscale("log")
    for i, v in enumerate(summary["imbalance_index"]):
        ax.annotate(f"I={v:.2f}", (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                    fontsize=8)
    ax.set_title(title, pad=18)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def head_share_heatmap(shares: pd.DataFrame, path: str | Path) -> Path:
    """One layer x head panel per objective of the decision share of that head's gradient."""
    objectives = list(dict.fromkeys(shares["objective"]))
    fig, axes = plt.subplots(1, len(objectives), figsize=(3.2 * len(objectives), 3.2), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        table = shares[shares.objective == objective].pivot(index="layer", columns="head", values="decision_share")
        sns.heatmap(table, ax=ax, cmap="viridis", vmin=0, vmax=1, annot=True, fmt=".2f", cbar=False,
                    annot_kws={"size": 7})
        ax.set_title(objective, fontsize=9)
    fig.suptitle("decision share |g_d| / (|g_s| + |g_d|) per head")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
