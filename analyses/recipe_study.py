"""Which training recipe gives a decision that checks the candidate? One row per trained stage.

    python analyses/recipe_study.py LABEL=STAGE_DIR_OR_SHIPPED_NAME ... [--questions 1200]
                                    [--out runs/analyses/recipe_study]

For each model, on held-out questions of the hard cells (:func:`tsds_interp.metrics.hard_cells`):
within-question paired AUC at the first and second decision, the share of the behavioural accept
gap that is within-question, greedy accuracy, and first-attempt vs realized accuracy of full
reflective rollouts (temperature 1, the task's budget), all with 95% intervals; plus steps and wall
time read from the stage's ``log.jsonl``. Writes ``recipes.csv`` and ``summary.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import fmt  # noqa: E402

from tsds_interp import cli  # noqa: E402
from tsds_interp.metrics import ds_metrics  # noqa: E402
from tsds_interp.model import config_of, load, resolve_checkpoint  # noqa: E402
from tsds_interp.rollout import progress, rollout  # noqa: E402
from tsds_interp.task import TaskConfig, sample_questions  # noqa: E402
from tsds_interp.verification import collect_verification, hard_cells, verification_table  # noqa: E402

SHOWN = ("within_auc@1", "within_auc@2", "within_share", "corruption_auc", "own_logprob_auc", "greedy_accuracy",
         "p_s_first", "realized_accuracy", "reflection_gain")


def training_record(path: Path) -> dict:
    """Steps and wall time of a stage folder (empty for a shipped checkpoint)."""
    stage = path.parent if path.name == "checkpoint" else path
    log = stage / "log.jsonl"
    if not log.is_file():
        return {"steps": "—", "wall_s": "—"}
    rows = [r for r in log.read_text().splitlines() if r.strip()]
    if not rows:  # a stage that has not logged yet
        return {"steps": "—", "wall_s": "—"}
    try:
        last = json.loads(rows[-1])
    except json.JSONDecodeError:
        raise ValueError(f"{log}: the last row is torn; `python -m tsds_interp.train ... --resume` drops it") from None
    return {"steps": last.get("step", "—"), "wall_s": round(last.get("elapsed_s", np.nan))}


def evaluate(label: str, where: str, n_questions: int, seed: int = 0) -> list[dict]:
    path = resolve_checkpoint(where)
    model = load(path)
    task = config_of(model).task
    cells = hard_cells(task)
    parsed = TaskConfig.parse_cells(cells)
    q = sample_questions(task, "test", n_questions, seed=10_007 + seed, cells=parsed)
    r = rollout(model, q, task=task, temperature=1.0, seed=seed + 3)  # one set of episodes for both tables
    v = verification_table(collect_verification(model, q, seed=seed), cells, r, seed=seed)
    v = v[v.cell == "hard"].set_index("metric")
    ds = ds_metrics(r).query("cell == 'all'").set_index("metric")
    gain = (r.final_correct.float() - r.correct[:, 0].float()).numpy()
    half = 1.96 * gain.std(ddof=1) / np.sqrt(len(gain))
    record = {"recipe": label, "checkpoint": str(where), **training_record(path)}
    rows = []
    for metric in ("within_auc@1", "within_auc@2", "greedy_accuracy", "accept_gap", "accept_gap_within",
                   "corruption_auc", "own_logprob_auc"):
        rows.append({**record, "metric": metric, **v.loc[metric, ["value", "lo", "hi"]].to_dict()})
    for metric in ("p_s_first", "realized_accuracy"):
        rows.append({**record, "metric": metric, **ds.loc[metric, ["value", "lo", "hi"]].to_dict()})
    rows.append({**record, "metric": "reflection_gain", "value": gain.mean(), "lo": gain.mean() - half,
                 "hi": gain.mean() + half})
    share = v.loc["accept_gap_within", "value"] / v.loc["accept_gap", "value"]
    rows.append({**record, "metric": "within_share", "value": share, "lo": np.nan, "hi": np.nan})
    return rows


def summary(df: pd.DataFrame, command: str) -> str:
    def cell(r):
        return f"{r.value:.3f}" if np.isnan(r.lo) else fmt(r.value, r.lo, r.hi)
    values = df.assign(v=[cell(r) for r in df.itertuples()]).pivot(index="recipe", columns="metric", values="v")
    info = df.groupby("recipe", sort=False)[["steps", "wall_s"]].first()
    table = info.join(values.reindex(columns=list(SHOWN))).reset_index()
    return "\n".join(["# Recipe study (hard cells, held-out questions)", "", f"Command: `{command}`", "",
                      "within_share = within-question part / behavioural accept gap; reflection_gain = "
                      "realized - first-attempt accuracy.", "", table.to_markdown(index=False), ""])


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/recipe_study.py", __doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="LABEL=stage folder, checkpoint folder or shipped name")
    p.add_argument("--questions", type=cli.integer(1), default=1200, help="held-out hard-cell questions per model")
    cli.add_output(p, "runs/analyses/recipe_study")
    return p


def _run(args, argv=None) -> int:
    pairs = [m.split("=", 1) if "=" in m else (m, m) for m in args.models]
    df = pd.DataFrame([row for label, where in progress(pairs, "recipes", "model")
                       for row in evaluate(label, where, args.questions)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "recipes.csv", index=False)
    text = summary(df, "python analyses/recipe_study.py " + " ".join(argv or sys.argv[1:]))
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="recipe_study")

if __name__ == "__main__":
    sys.exit(main())
