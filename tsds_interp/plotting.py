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
