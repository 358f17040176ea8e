"""The analysis scripts end to end on the tiny step-format pipeline (small sizes: the numbers are not
the point, the tables are)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ANALYSES = Path(__file__).parent.parent / "analyses"


def _run(script: str, *args) -> None:
    proc = subprocess.run([sys.executable, str(ANALYSES / script), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_step_format_analysis_set_runs_end_to_end(trained_steps, tmp_path):
    _, runs = trained_steps
    circuits = tmp_path / "circuits"
    _run("circuit_dissociation.py", "--seed-runs", runs, "--labels", "sft", "rl", "--pairs", 4, "--questions", 8,
         "--eval-questions", 16, "--samples", 4, "--controls", 2, "--out", circuits)
    effects = pd.read_csv(circuits / "dissociation.csv")
    assert set(effects.ablation) == {"none", "mean", "resample"} and set(effects.label) == {"sft", "rl"}
    assert effects.ablated.str.contains("control 1").any()
    assert {"within_auc", "sample_accuracy"} <= set(effects.metric)
    assert "Dissociation targets" in (circuits / "summary.md").read_text()
    assert (circuits / "dissociation.png").is_file() and list(circuits.glob("graph_*_decision.png"))

    where = tmp_path / "where"
    _run("where_rl_changed.py", "--seed-runs", runs, "--from", circuits, "--questions", 16, "--samples", 4,
         "--out", where)
    transplant = pd.read_csv(where / "transplant.csv")
    assert {"sft", "rl", "sft + rl sampling circuit"} <= set(transplant.model)
    assert (where / "weight_change.csv").is_file()

    anatomy = tmp_path / "anatomy"
    _run("reflection_anatomy.py", "--seed-runs", runs, "--questions", 32, "--out", anatomy)
    parts = pd.read_csv(anatomy / "decomposition.csv")
    assert set(parts.level) == {"step", "episode"} and set(parts.part) == {"total", "sampling", "decision"}
    metrics = pd.read_csv(anatomy / "metrics.csv")
    assert {"within_auc@1", "e_plus@1", "episode_accuracy", "mean_calls"} <= set(metrics.metric)

    gradients = tmp_path / "gradients"
    _run("gradient_attribution.py", "--checkpoints", f"{runs}/rl/checkpoint:{runs}/sft/checkpoint", "--questions", 4,
         "--seeds", 0, 1, "--out", gradients)
    table = pd.read_csv(gradients / "imbalance.csv")
    assert {"surrogate", "sft_token_mean", "sft_role_balanced", "kl"} <= set(table.objective)
