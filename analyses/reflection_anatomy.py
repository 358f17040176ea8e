"""Per difficulty cell, the DS anatomy of SFT and RL models and where RL's accuracy gain comes from.

    python analyses/reflection_anatomy.py [--seed-runs runs/full_s0 runs/full_s1 runs/full_s2]
                                          [--questions 2048] [--out runs/analyses/reflection_anatomy]

Without ``--seed-runs`` it compares the shipped ``sft`` and ``rl`` checkpoints (one seed; intervals
over questions); with them, ``RUN/sft`` and ``RUN/rl`` of each run (intervals over seeds).
Writes ``metrics.csv`` (every model), ``anatomy.csv`` (mean and 95% interval), ``decomposition.csv``
(RL-minus-SFT predicted-accuracy gain split into sampling and decision parts), a figure and
``summary.md``.
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
from tsds_interp.metrics import gain_decomposition  # noqa: E402

SHOWN = ("p_s_first", "p_d_given_c", "p_d_given_w", "realized_accuracy", "within_auc@1")


def decomposition(metrics: pd.DataFrame, budget: int = 3) -> pd.DataFrame:
    """RL - SFT gain split per seed, then mean over seeds; step models also at the episode level."""
    levels = ("step", "episode") if "mean_calls" in set(metrics.metric) else ("step",)
    parts = []
    for seed in sorted(metrics.seed.unique()):
        m = metrics[metrics.seed == seed]
        for level in levels:
            parts.append(gain_decomposition(m[m.label == "sft"], m[m.label == "rl"], budget, level=level
                                            ).assign(seed=seed))
    return over_seeds(pd.concat(parts), keys=("level", "cell", "part"))


def figure(anatomy: pd.DataFrame, dec: pd.DataFrame, path: Path, questions: int) -> None:
    cells = [c for c in anatomy.cell.unique() if c != "all"] + ["all"]
    fig, axes = plt.subplots(1, len(SHOWN) + 1, figsize=(4 * (len(SHOWN) + 1), 3.8))
    for ax, metric in zip(axes, SHOWN):
        cell_points(ax, anatomy, metric, ("sft", "rl"), cells)
    ax = axes[-1]
    dec = dec[dec.level == "step"]
    for i, part_name in enumerate(("sampling", "decision", "total")):
        part = dec[dec.part == part_name].set_index("cell").reindex([c for c in cells if c in set(dec.cell)])
        x = [j + (i - 1) * 0.25 for j in range(len(part))]
        ax.bar(x, part["mean"], width=0.25, label=part_name,
               yerr=np.clip([part["mean"] - part["lo"], part["hi"] - part["mean"]], 0, None), capsize=2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(part)), part.index, rotation=45, fontsize=8)
    ax.set(title="RL - SFT predicted accuracy: parts", ylabel="change (95% interval)")
    ax.legend(fontsize=8)
    title_over_seeds(fig, anatomy, "Anatomy of reflection per cell, SFT vs RL (last panel: the change in "
                     "predicted accuracy split into sampling and decision parts)", questions)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(anatomy: pd.DataFrame, dec: pd.DataFrame, command: str) -> str:
    wide = anatomy[anatomy.metric.isin(SHOWN)].assign(v=lambda d: [fmt(*r) for r in d[["mean", "lo", "hi"]].values])
    table = wide.pivot_table(index="cell", columns=["label", "metric"], values="v", aggfunc="first", sort=False)
    dwide = dec.assign(v=lambda d: [fmt(*r) for r in d[["mean", "lo", "hi"]].values])
    dtable = dwide.pivot_table(index=["level", "cell"], columns="part", values="v", aggfunc="first", sort=False)
    seeds = int(anatomy.seeds.max())
    return "\n".join([
        "# Reflection anatomy: SFT vs RL", "", f"Command: `{command}`", "",
        f"Seeds: {seeds}; values are means with 95% intervals "
        + ("over seeds." if seeds > 1 else "over questions (Wilson)."), "",
        table.to_markdown(), "",
        "## RL-minus-SFT predicted accuracy (budget 3), split into sampling and decision parts", "",
        "(level `episode`, step models only: predicted episode accuracy A ** mean calls per cell)", "",
        dtable[["total", "sampling", "decision"]].to_markdown(), ""])


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/reflection_anatomy.py", __doc__.split("\n\n")[0])
    p.add_argument("--seed-runs", nargs="*", help="run folders holding sft/ and rl/ (one per seed)")
    p.add_argument("--questions", type=cli.integer(1), default=2048, help="held-out test questions per model")
    cli.add_output(p, "runs/analyses/reflection_anatomy")
    return p


def _run(args, argv=None) -> int:
    metrics = evaluate_groups(checkpoint_groups(["sft", "rl"], args.seed_runs), args.questions)
    anatomy = over_seeds(metrics[metrics.metric.isin(KEY_METRICS)])
    dec = decomposition(metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    anatomy.to_csv(out / "anatomy.csv", index=False)
    dec.to_csv(out / "decomposition.csv", index=False)
    figure(anatomy, dec, out / "reflection_anatomy.png", args.questions)
    text = summary(anatomy, dec, "python analyses/reflection_anatomy.py " + " ".join(argv or sys.argv[1:]))
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="reflection_anatomy")

if __name__ == "__main__":
    sys.exit(main())
