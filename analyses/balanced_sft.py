"""Does role-balanced SFT close part of the SFT-to-RL gap, at equal SFT compute?

    python analyses/balanced_sft.py [--seed-runs runs/full_s0 runs/full_s1 runs/full_s2]
                                    [--questions 2048] [--out runs/analyses/balanced_sft]

Compares ``sft`` (token_mean), ``sft_balanced`` (role_balanced, decision share 0.5, same steps,
batch and data) and ``rl``. Writes ``metrics.csv``, ``comparison.csv`` (mean, 95% interval and
the share of the SFT-to-RL gap closed), a figure and ``summary.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY_METRICS, cell_points, checkpoint_groups, evaluate_groups, fmt, over_seeds, title_over_seeds  # noqa: E402

from tsds_interp import cli  # noqa: E402

LABELS = ("sft", "sft_balanced", "rl")
SHOWN = ("p_s_first", "p_d_given_c", "p_d_given_w", "realized_accuracy", "within_auc@1")


def gap_closed(agg: pd.DataFrame) -> pd.DataFrame:
    """(balanced - sft) / (rl - sft) per cell and metric, from the means."""
    w = agg.pivot_table(index=["cell", "metric"], columns="label", values="mean")
    with np.errstate(divide="ignore", invalid="ignore"):
        w["gap_closed"] = (w["sft_balanced"] - w["sft"]) / (w["rl"] - w["sft"])
    return w.reset_index()


def figure(agg: pd.DataFrame, path: Path, questions: int) -> None:
    cells = [c for c in agg.cell.unique() if c != "all"] + ["all"]
    fig, axes = plt.subplots(1, len(SHOWN), figsize=(4 * len(SHOWN), 3.8))
    for ax, metric in zip(axes, SHOWN):
        cell_points(ax, agg, metric, LABELS, cells)
    title_over_seeds(fig, agg, "Held-out DS metrics per cell, SFT vs role-balanced SFT", questions)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/balanced_sft.py", __doc__.split("\n\n")[0])
    p.add_argument("--seed-runs", nargs="*", help="run folders holding sft/, sft_balanced/ and rl/")
    p.add_argument("--questions", type=cli.integer(1), default=2048)
    cli.add_output(p, "runs/analyses/balanced_sft")
    return p


def _run(args, argv=None) -> int:
    metrics = evaluate_groups(checkpoint_groups(list(LABELS), args.seed_runs), args.questions)
    agg = over_seeds(metrics[metrics.metric.isin(KEY_METRICS)])
    gaps = gap_closed(agg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    agg.merge(gaps[["cell", "metric", "gap_closed"]], on=["cell", "metric"]).to_csv(out / "comparison.csv",
                                                                                   index=False)
    figure(agg, out / "balanced_sft.png", args.questions)
    shown = agg[agg.metric.isin(SHOWN)].assign(v=lambda d: [fmt(*r) for r in d[["mean", "lo", "hi"]].values])
    table = shown.pivot_table(index="cell", columns=["metric", "label"], values="v", aggfunc="first", sort=False)
    gtable = gaps[gaps.metric.isin(("p_d_given_w", "realized_accuracy"))].pivot(
        index="cell", columns="metric", values="gap_closed")
    text = "\n".join([
        "# Role-balanced SFT vs SFT vs RL", "",
        "Command: `python analyses/balanced_sft.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        f"Seeds: {int(agg.seeds.max())}; means with 95% intervals.", "", table.to_markdown(), "",
        "## Share of the SFT-to-RL gap closed by role-balanced SFT ((balanced - sft) / (rl - sft))", "",
        gtable.to_markdown(floatfmt=".2f"), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="balanced_sft")

if __name__ == "__main__":
    sys.exit(main())
