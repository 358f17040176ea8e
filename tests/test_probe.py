"""Probes: recover a planted direction; on real rows the prompt-only control scores exactly 0.5."""

import numpy as np
import pytest
import torch

from tsds_interp.cli.probe import main
from tsds_interp.probe import fit_probe, probe_rows, probe_study, readout_direction, rows_within_auc


def test_probe_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    d, n, sep = 32, 4000, 2.0
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    y = torch.arange(n) % 4 == 0  # one truth and three wrong rows per question
    x = torch.randn(n, d, generator=g) + 3.0 + sep * y[:, None].float() * direction
    w, b = fit_probe(x, y)
    assert torch.nn.functional.cosine_similarity(w, direction, dim=0) > 0.95
    auc = rows_within_auc(x @ w, torch.arange(n) // 4, y).mean()
    # two unit-variance normals sep apart along w: P(truth > wrong) = Phi(sep / sqrt 2) = 0.921
    assert abs(auc - 0.921) < 0.03
    assert rows_within_auc(torch.zeros(n), torch.arange(n) // 4, y).mean() == 0.5  # ties count half


def test_probe_rows_pair_truth_with_own_wrong_samples_and_control_is_chance(random_model):
    task = random_model.tsds_config.task
    rows = probe_rows(random_model, task, "train", 64, samples=4, seed=0)
    for q in rows.question.unique():
        m = rows.question == q
        assert rows.correct[m].sum() == 1 and (~rows.correct[m]).sum() >= 1
    df = probe_study(random_model, train_questions=64, test_questions=64, samples=4, n_boot=50)
    L, H = random_model.cfg.n_layers, random_model.cfg.n_heads
    assert set(df.site) == {f"resid {layer}" for layer in range(L + 1)} | {
        f"L{layer}H{h}" for layer in range(L) for h in range(H)}
    control = df[df.position == "prompt_end"]
    assert np.allclose(control.probe_auc.dropna(), 0.5) and np.allclose(control.readout_auc.dropna(), 0.5)
    assert readout_direction(random_model).shape == (random_model.cfg.d_model,)


@pytest.mark.parametrize("argv, words", [
    (["--train-questions", "3"], "--train-questions: must be an integer in [16, 1000000], got 3"),
    (["--temperature", "0"], "--temperature: must be a finite number in (0, 100], got 0.0"),
    (["--cells", "9x9"], "in-distribution cells"),
])
def test_probe_cli_rejects_bad_input(argv, words, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
