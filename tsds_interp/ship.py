"""Ship a trained stage as a named checkpoint inside the package, with its manifest entry.

``python -m tsds_interp.ship runs/small_s0/rl rl --command "python -m tsds_interp.train ..."``
copies the stage's ``checkpoint/model.safetensors`` and ``config.json`` (no optimizer state) to
``tsds_interp/checkpoints/NAME``, evaluates it on the standard held-out set
(:func:`tsds_interp.metrics.heldout_metrics`) and records, in ``manifest.json`` and
``heldout_metrics.csv``: the command, seed, commit, steps, wall time and the metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from tsds_interp.metrics import heldout_metrics
from tsds_interp.model import SHIPPED_DIR, CheckpointError, load, replace_dir


def ship(stage_dir: str | Path, name: str, command: str, dest: Path = SHIPPED_DIR) -> dict:
    stage = Path(stage_dir)
    ckpt = stage / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{stage} has no checkpoint/model.safetensors; train the stage first")
    if not name.isidentifier():
        raise ValueError(f"checkpoint name {name!r} must be a plain identifier (letters, digits, _)")
    run = json.loads((stage / "run.json").read_text()) if (stage / "run.json").is_file() else {}
    wall = stage / "wall_time_s.txt"
    metrics = heldout_metrics(load(ckpt))
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))
    for f in ("model.safetensors", "config.json"):
        shutil.copy2(ckpt / f, tmp / f)
    replace_dir(tmp, dest / name)
    train_cfg = run.get("config", {})
    entry = {"command": command, "seed": train_cfg.get("seed"), "stage": train_cfg.get("stage"),
             "steps": json.loads((ckpt / "train_state.json").read_text())["step"]
             if (ckpt / "train_state.json").is_file() else None,
             "wall_time_s": float(wall.read_text()) if wall.is_file() else None,
             "commit": run.get("versions", {}).get("git_commit"),
             "init": run.get("init"), "ref": run.get("ref") if train_cfg.get("stage") == "rl" else None,
             "heldout_all": metrics[metrics.cell == "all"].set_index("metric")["value"].round(4).to_dict()}
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    table_path = dest / "heldout_metrics.csv"
    table = pd.read_csv(table_path) if table_path.is_file() else pd.DataFrame()
    if len(table):
        table = table[table.model != name]
    pd.concat([table, metrics.assign(model=name)], ignore_index=True).to_csv(table_path, index=False)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tsds_interp.ship", description=__doc__.split("\n\n")[0])
    p.add_argument("stage_dir", help="a training stage folder (holds checkpoint/ and run.json)")
    p.add_argument("name", help="shipped name, e.g. base, sft, rl, sft_balanced")
    p.add_argument("--command", required=True, help="the command that trained the stage, for the manifest")
    args = p.parse_args(argv)
    try:
        entry = ship(args.stage_dir, args.name, args.command)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({args.name: entry}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
