import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tsds_interp.cli.ship import main
from tsds_interp.model import CheckpointError, load
from tsds_interp.ship import ship


def test_ship_copies_weights_and_records_manifest(trained_tiny, tmp_path):
    paths, out = trained_tiny
    entry = ship(out / "rl", "rl_tiny", "python -m tsds_interp.train pipeline --preset tiny", dest=tmp_path)
    assert sorted(p.name for p in (tmp_path / "rl_tiny").iterdir()) == ["config.json", "model.safetensors"]
    a, b = load(paths["rl"]), load(tmp_path / "rl_tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rl_tiny"]["stage"] == "rl" and manifest["rl_tiny"]["steps"] == 30
    assert entry["heldout_all"]["realized_accuracy"] == pytest.approx(
        pd.read_csv(tmp_path / "heldout_metrics.csv").query("cell == 'all' and metric == 'realized_accuracy'")
        .value.item(), abs=1e-4)
    with pytest.raises(ValueError, match="pass --force"):  # an existing name is never replaced silently
        ship(out / "rl", "rl_tiny", "again", dest=tmp_path)
    ship(out / "rl", "rl_tiny", "again", dest=tmp_path, force=True)  # re-shipping replaces, never duplicates
    assert len(pd.read_csv(tmp_path / "heldout_metrics.csv").query("cell == 'all'").model.unique()) == 1


def test_ship_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="train the stage first"):
        ship(tmp_path, "x", "cmd", dest=tmp_path)
    assert main([str(tmp_path / "nope"), "x", "--command", "c"]) == 2
    assert "train the stage first" in capsys.readouterr().err


def test_ship_into_a_place_without_files_is_refused_before_the_evaluation(trained_tiny, monkeypatch):
    import tsds_interp.ship as ship_module

    _, out = trained_tiny
    monkeypatch.setattr(ship_module, "heldout_metrics", lambda *a, **k: pytest.fail("evaluated before refusing"))
    with pytest.raises(ValueError, match="ship destination /proc/tsds_shipped: files cannot be created in /proc"):
        ship(out / "rl", "rl_tiny", "cmd", dest=Path("/proc/tsds_shipped"))


def test_every_shipped_name_loads():
    for name in ("base", "sft", "rl", "sft_balanced"):
        assert load(name).cfg.n_layers == 4
