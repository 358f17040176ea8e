"""The analysis scripts end to end on the tiny step-format pipeline (small sizes: the numbers are not
the point, the tables, the run records and what the figures say are)."""

import importlib
import json
import sys
from pathlib import Path

import pandas as pd

ANALYSES = Path(__file__).parent.parent / "analyses"


def _run(script: str, *args) -> Path:
    """``python analyses/SCRIPT ARGS`` in this process (its ``main``); returns its ``--out``."""
    sys.path.insert(0, str(ANALYSES))
    try:
        module = importlib.import_module(script.removesuffix(".py"))
    finally:
        sys.path.remove(str(ANALYSES))
    argv = list(map(str, args))
    assert module.main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    record = json.loads((out / "run.json").read_text())
    assert record["tool"] == script.removesuffix(".py") and record["files"], record
    assert all((out / f).is_file() for f in record["files"])
    return out


def test_the_step_format_analysis_set_runs_end_to_end(trained_steps, tmp_path, figures):
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
    assert "n = 8 held-out questions per ablation" in figures["dissociation.png"]
    assert "(1 seed), 95% intervals" in figures["dissociation.png"], figures["dissociation.png"]
    assert "top 12 decision edges" in figures["graph_rl_s0_decision.png"]

    where = tmp_path / "where"
    _run("where_rl_changed.py", "--seed-runs", runs, "--from", circuits, "--questions", 16, "--samples", 4,
         "--out", where)
    transplant = pd.read_csv(where / "transplant.csv")
    assert {"sft", "rl", "sft + rl sampling circuit"} <= set(transplant.model)
    assert (where / "weight_change.csv").is_file()
    assert "one seed, no interval; n = 16 held-out questions" in figures["where_rl_changed.png"]

    anatomy = tmp_path / "anatomy"
    _run("reflection_anatomy.py", "--seed-runs", runs, "--questions", 32, "--out", anatomy)
    parts = pd.read_csv(anatomy / "decomposition.csv")
    assert set(parts.level) == {"step", "episode"} and set(parts.part) == {"total", "sampling", "decision"}
    metrics = pd.read_csv(anatomy / "metrics.csv")
    assert {"within_auc@1", "e_plus@1", "episode_accuracy", "mean_calls"} <= set(metrics.metric)
    title = figures["reflection_anatomy.png"]
    assert "sft, rl; one seed, 95% intervals over questions" in title and "n = 32 held-out questions" in title, title

    gradients = tmp_path / "gradients"
    _run("gradient_attribution.py", "--checkpoints", f"{runs}/rl/checkpoint:{runs}/sft/checkpoint", "--questions", 4,
         "--seeds", 0, 1, "--out", gradients)
    table = pd.read_csv(gradients / "imbalance.csv")
    assert {"surrogate", "sft_token_mean", "sft_role_balanced", "kl"} <= set(table.objective)
    for name in ("gradient_mass_rl.png", "head_decision_share_rl.png"):
        assert "n=4 questions x 8 rollouts" in figures[name], figures[name]


def test_a_stage_with_an_empty_or_torn_log_is_reported_not_a_traceback(tmp_path):
    import pytest

    sys.path.insert(0, str(ANALYSES))
    try:
        recipe_study = importlib.import_module("recipe_study")
    finally:
        sys.path.remove(str(ANALYSES))
    stage = tmp_path / "stage"
    (stage / "checkpoint").mkdir(parents=True)
    (stage / "log.jsonl").write_text("")
    assert recipe_study.training_record(stage / "checkpoint") == {"steps": "—", "wall_s": "—"}
    (stage / "log.jsonl").write_text('{"step": 3, "elapsed_s": 2.4}\n{"step": 4, "el')
    with pytest.raises(ValueError, match="the last row is torn"):
        recipe_study.training_record(stage / "checkpoint")
    (stage / "log.jsonl").write_text('{"step": 3, "elapsed_s": 2.4}\n')
    assert recipe_study.training_record(stage / "checkpoint") == {"steps": 3, "wall_s": 2}
