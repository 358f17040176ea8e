"""Every figure the command lines write says what it measures, on which model, with how many
samples, and (where there is one) the contrast's size and interval; colour bars are labelled.
Figures are rendered on the tiny trained models and read back from matplotlib before saving (the
``figures`` fixture of conftest.py)."""

import os
import re

os.environ.setdefault("TQDM_DISABLE", "1")


INTERVAL = re.compile(r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]")


def test_patch_figures_carry_the_gap_its_interval_pairs_cells_and_model(trained_tiny, tmp_path, figures):
    from tsds_interp.cli.patch import main

    paths, _ = trained_tiny
    assert main(["--checkpoint", str(paths["sft"]), "--pairs", "4", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    for name in ("decision_head.png", "sampling_head.png"):
        text = figures[name]
        assert INTERVAL.search(text) and "pairs" in text and "cells" in text and "sft" in text, text
        assert "effect" in text or "normalized" in text  # the colour bar names its quantity


def test_verify_figure_names_the_model_and_n(trained_tiny, tmp_path, figures):
    from tsds_interp.cli.verify import main

    paths, _ = trained_tiny
    assert main(["--checkpoint", str(paths["sft"]), "--questions", "24", "--samples", "2", "--bootstrap", "20",
                 "--out", str(tmp_path / "v")]) == 0
    text = figures["verification.png"]
    assert "n=24 held-out questions x 2 samples" in text and "95% intervals" in text and "checkpoint" in text, text


def test_probe_figures_name_the_model_n_and_the_chance_scale(trained_tiny, tmp_path, figures):
    from tsds_interp.cli.probe import main

    paths, _ = trained_tiny
    assert main(["--checkpoint", str(paths["sft"]), "--train-questions", "16", "--test-questions", "16",
                 "--samples", "2", "--bootstrap", "20", "--out", str(tmp_path / "pr"), "--quiet"]) == 0
    for name in ("probe_resid.png", "probe_heads.png"):
        text = figures[name]
        assert "sft" in text and "(n=" in text and "within-question AUC" in text, text


def test_ablation_and_attribution_figures_name_model_n_and_quantity(trained_tiny, tmp_path, figures):
    from tsds_interp.cli.ablation import main as ablation_main
    from tsds_interp.cli.attribution import main as attribution_main

    paths, _ = trained_tiny
    assert ablation_main(["--checkpoint", str(paths["sft"]), "--questions", "8", "--out", str(tmp_path / "a"),
                          "--quiet"]) == 0
    ablation = {k: v for k, v in figures.items() if k.startswith("ablation_")}
    assert ablation
    for text in ablation.values():
        assert "sft" in text and "n=8 questions" in text and "baseline" in text, text
    assert attribution_main(["--checkpoint", str(paths["sft"]), "--questions", "4", "--group", "2",
                             "--out", str(tmp_path / "g")]) == 0
    for name in ("gradient_mass.png", "head_decision_share.png"):
        assert "sft" in figures[name] and "n=4 questions x 2 rollouts" in figures[name], figures[name]


def test_the_readme_opens_with_the_three_commands():
    from pathlib import Path

    head = "\n".join((Path(__file__).parents[1] / "README.md").read_text().splitlines()[:40])
    for command in ('pip install -e ".[dev]"', "python -m pytest", "python -m tsds_interp.patch"):
        assert command in head, command
