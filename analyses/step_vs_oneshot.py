"""One-shot vs step format on the cells both cover: accuracy with and without reflection, and whether
the decision verifies.

    python analyses/step_vs_oneshot.py [--models sft rl steps_sft steps_rl] [--questions 1200]
                                       [--cells 1x1,1x2,2x1,2x2,1x3,3x1,2x3,3x2] [--out runs/analyses/step_vs_oneshot]

For each checkpoint (shipped name or folder), on held-out questions of ``--cells`` (default: the
one-shot task's in-distribution cells, which the step models also cover), for all those cells and
for the hardest of them (most digits in all): ``greedy`` (final accuracy of greedy episodes without
reflection), ``first_attempt`` (temperature 1, budget 1), ``realized`` (temperature 1, the model's
budget), and the decision: ``within_auc`` (one-shot: truth vs own wrong answers of the same question;
steps: truth vs own wrong steps of the same state), ``e_plus`` = P(ACCEPT | wrong) and ``e_minus`` =
P(REJECT | right) at the first attempt (one-shot: whole answers; steps: single steps). Writes
``comparison.csv``, ``comparison.png`` and ``summary.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tsds_interp import cli  # noqa: E402
from tsds_interp.model import load  # noqa: E402
from tsds_interp.plotting import wrapped  # noqa: E402
from tsds_interp.rollout import progress, rollout  # noqa: E402
from tsds_interp.stats import wilson  # noqa: E402
from tsds_interp.task import TaskConfig, sample_questions  # noqa: E402
from tsds_interp.verification import verification_metrics  # noqa: E402

COLUMNS = ("greedy", "first_attempt", "realized", "within_auc", "e_plus", "e_minus")


def _accuracy(model, cells, n: int, temperature: float, budget: int | None) -> tuple[float, float, float, int]:
    task = model.tsds_config.task
    q = sample_questions(task, "test", n, seed=10_007, cells=cells)
    hit = rollout(model, q, temperature=temperature, budget=budget, seed=3).final_correct.numpy()
    lo, hi = wilson(int(hit.sum()), len(hit))
    return float(hit.mean()), float(lo), float(hi), len(hit)


def _decision(model, cells, n: int) -> dict[str, tuple[float, float, float, int]]:
    df = verification_metrics(model, n, samples=8, cells=tuple(TaskConfig.cell_name(c) for c in cells), n_boot=500)
    m = df[df.cell == "all"].set_index("metric")

    def get(k):
        return tuple(m.loc[k, ["value", "lo", "hi", "n"]])
    if model.tsds_config.task.steps:
        return {"within_auc": get("within_auc@1"), "e_plus": get("e_plus@1"), "e_minus": get("e_minus@1")}
    def flip(k):
        return (1 - m.loc[k, "value"], 1 - m.loc[k, "hi"], 1 - m.loc[k, "lo"], m.loc[k, "n"])
    return {"within_auc": get("within_auc@1"), "e_plus": flip("p_d_given_w@1"), "e_minus": flip("p_d_given_c@1")}


def compare(models: list[str], cells: list[tuple[int, int]], n: int) -> pd.DataFrame:
    top = max(a + b for a, b in cells)
    groups = {"all": cells, "hard": [c for c in cells if sum(c) == top]}
    rows = []
    for name in progress(models, "models", "model"):
        model = load(name)
        task = model.tsds_config.task
        missing = [c for c in cells if c not in task.train_cells]
        if missing:
            raise ValueError(f"{name} was not trained on cells {missing}; choose --cells both formats cover")
        for group, cs in groups.items():
            stats = {"greedy": _accuracy(model, cs, n, 0.0, 1), "first_attempt": _accuracy(model, cs, n, 1.0, 1),
                     "realized": _accuracy(model, cs, n, 1.0, None), **_decision(model, cs, n)}
            for metric, (v, lo, hi, k) in stats.items():
                rows.append(dict(model=name, format=task.task_format, group=group, metric=metric, value=v,
                                 lo=lo, hi=hi, n=int(k)))
    return pd.DataFrame(rows)


def figure(df: pd.DataFrame, path: Path, questions: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    models = list(df.model.unique())
    for ax, group in zip(axes, ("all", "hard")):
        part = df[df.group == group]
        width = 0.8 / len(models)
        for i, name in enumerate(models):
            m = part[part.model == name].set_index("metric").reindex(COLUMNS)
            x = np.arange(len(COLUMNS)) + (i - (len(models) - 1) / 2) * width
            err = np.clip([m.value - m.lo, m.hi - m.value], 0, None)
            ax.bar(x, m.value, width=width, yerr=err, capsize=2, label=name)
        ax.set_xticks(range(len(COLUMNS)), COLUMNS, rotation=20)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set(title=f"{group} shared cells", ylim=(0, 1.05))
    axes[0].set_ylabel("rate (95% interval)")
    axes[0].legend(fontsize=8)
    fig.suptitle(wrapped(f"One-shot vs step format on the cells both cover (accuracies: final answers; AUC, e+, "
                         f"e-: the decision); n = {questions} held-out questions per model and group, one seed each, "
                         "95% intervals; dotted: chance for the AUC", fig.get_figwidth()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interval(row) -> str:
    return "—" if np.isnan(row.value) else f"{row.value:.3f} [{row.lo:.3f}, {row.hi:.3f}]"


def summary(df: pd.DataFrame) -> str:
    lines = ["| model | format | cells | " + " | ".join(COLUMNS) + " |", "|---" * (3 + len(COLUMNS)) + "|"]
    for (name, group), part in df.groupby(["model", "group"], sort=False):
        m = part.set_index("metric")
        cells = " | ".join(_interval(m.loc[k]) for k in COLUMNS)
        lines.append(f"| {name} | {part.format.iloc[0]} | {group} | {cells} |")
    return "\n".join(lines) + "\n"


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/step_vs_oneshot.py", __doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["sft", "rl", "steps_sft", "steps_rl"],
                   help="checkpoints (shipped names or folders)")
    p.add_argument("--questions", type=cli.integer(10, 10**6), default=1200, help="held-out questions per group")
    p.add_argument("--cells", default="1x1,1x2,2x1,2x2,1x3,3x1,2x3,3x2", help="cells both formats cover")
    cli.add_output(p, "runs/analyses/step_vs_oneshot")
    return p


def _run(args) -> int:
    try:
        cells = list(TaskConfig.parse_cells(args.cells, "--cells"))
        if not cells or any(len(c) != 2 for c in cells):
            raise ValueError
    except ValueError:
        raise ValueError(f"--cells must be comma-separated AxB cells such as 2x3,3x2, got {args.cells!r}") from None
    df = compare(args.models, cells, args.questions)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "comparison.csv", index=False)
    figure(df, out / "comparison.png", args.questions)
    text = summary(df)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args), argv, tool="step_vs_oneshot")


if __name__ == "__main__":
    sys.exit(main())
