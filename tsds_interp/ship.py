"""Ship a trained stage as a named checkpoint inside the package, with its manifest entry.

``python -m tsds_interp.ship runs/small_s0/rl rl --command "python -m tsds_interp.train ..."``
copies the stage's ``checkpoint/model.safetensors`` and ``config.json`` (no optimizer state) to
``tsds_interp/checkpoints/NAME``, evaluates it on the standard held-out set
(:func:`tsds_interp.metrics.heldout_metrics`) and records, in ``manifest.json`` and
``heldout_metrics.csv``: the command, seed, commit, steps, wall time and the metrics.

Shipping is a transaction. The new checkpoint folder, metrics table and manifest are first written
beside the old ones under temporary names; one atomic write of a journal (``.ship.json``) then
commits the change, and the temporary files are renamed into place. A kill before the journal
leaves the old state (the temporary files are removed by :func:`finish_ship`); a kill after it
leaves a journal that :func:`finish_ship` completes, giving the new state. The next ship, and
every listing of the shipped checkpoints, calls :func:`finish_ship` first.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from tsds_interp import checks
from tsds_interp.model import SHIPPED_DIR, CheckpointError, load, replace_dir
from tsds_interp.verification import heldout_metrics


def ship(stage_dir: str | Path, name: str, command: str, dest: Path | None = None, force: bool = False) -> dict:
    """Ship ``stage_dir``'s checkpoint as ``name``. Everything is read and checked before anything
    is written; an existing ``name`` is replaced only with ``force``."""
    stage, dest = Path(stage_dir), Path(dest or SHIPPED_DIR)
    ckpt = stage / "checkpoint"
    if not name.isidentifier():
        raise ValueError(f"checkpoint name {name!r} must be a plain identifier (letters, digits, _)")
    if not command.strip():
        raise ValueError("--command is empty; give the command that trained the stage")
    checks.writable_dir(dest, "ship destination")  # before the evaluation, not after it
    if (dest / name).exists() and not force:
        raise ValueError(f"a checkpoint named {name!r} is already shipped in {dest}; pass --force to replace it")
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{stage} has no checkpoint/model.safetensors; train the stage first")
    run = _read_json_if_any(stage / "run.json", "run record")
    state = _read_json_if_any(ckpt / "train_state.json", "training state")
    wall = _wall_time(stage / "wall_time_s.txt")
    manifest_path, table_path = dest / "manifest.json", dest / "heldout_metrics.csv"
    manifest = checks.read_json(manifest_path, "manifest") if manifest_path.is_file() else {}
    table = _read_table(table_path)
    metrics = heldout_metrics(load(ckpt))
    train_cfg = run.get("config", {}) if isinstance(run.get("config"), dict) else {}
    entry = {"command": command, "seed": train_cfg.get("seed"), "stage": train_cfg.get("stage"),
             "steps": state.get("step"), "wall_time_s": wall,
             "commit": (run.get("versions") or {}).get("git_commit"),
             "init": run.get("init"), "ref": run.get("ref") if train_cfg.get("stage") == "rl" else None,
             "heldout_all": metrics[metrics.cell == "all"].set_index("metric")["value"].round(4).to_dict()}
    manifest[name] = entry
    if len(table):
        table = table[table.model != name]
    table = pd.concat([table, metrics.assign(model=name)], ignore_index=True)

    dest.mkdir(parents=True, exist_ok=True)
    finish_ship(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))
    try:
        for f in ("model.safetensors", "config.json"):
            shutil.copyfile(ckpt / f, tmp / f)
        staged = {"table": _stage(table_path, table.to_csv(index=False)),
                  "manifest": _stage(manifest_path, json.dumps(manifest, indent=2) + "\n")}
    except BaseException:
        _remove_staged(dest)
        raise
    journal = {"name": name, "folder": tmp.name, **{k: v.name for k, v in staged.items()}}
    _write_atomic(dest / JOURNAL, json.dumps(journal))  # the commit point
    finish_ship(dest)
    return entry


JOURNAL = ".ship.json"


def finish_ship(dest: Path) -> None:
    """Bring ``dest`` to a consistent state after a ship that was stopped: complete a committed one
    (its journal is there), remove what an uncommitted one staged. Each step can be repeated."""
    journal_path = dest / JOURNAL
    if not journal_path.is_file():
        _remove_staged(dest)
        return
    journal = checks.read_json(journal_path, "ship journal")
    folder = dest / journal["folder"]
    if folder.is_dir():
        replace_dir(folder, dest / journal["name"])
    for final in ("heldout_metrics.csv", "manifest.json"):
        staged = dest / journal["table" if final.endswith(".csv") else "manifest"]
        if staged.is_file():
            staged.replace(dest / final)
    journal_path.unlink()
    _remove_staged(dest)


def _stage(path: Path, text: str) -> Path:
    """``text`` written beside ``path`` under a temporary name."""
    staged = path.with_name(f".{path.name}.staged")
    staged.write_text(text)
    return staged


def _remove_staged(dest: Path) -> None:
    """Remove the temporary files and folders of a ship that did not commit (the dot-named entries
    of the shipped folder, except a replaced checkpoint's backup, which ``recover_dir`` puts back)."""
    for leftover in dest.glob(".*"):
        if leftover.is_dir() and not leftover.name.endswith(".old"):
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.is_file() and leftover.name.endswith((".staged", ".tmp")):
            leftover.unlink()


def _read_json_if_any(path: Path, what: str) -> dict:
    return checks.read_json(path, what) if path.is_file() else {}


def _wall_time(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        return float(checks.read_text(path))
    except ValueError:
        raise ValueError(f"{path} does not hold a number of seconds; fix or delete it") from None


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{path} is not a readable CSV ({str(e).splitlines()[0]}); restore it from git") from None
    if len(table) and "model" not in table.columns:
        raise ValueError(f"{path} has no 'model' column; restore it from git")
    return table


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":  # python -m tsds_interp.ship
    from tsds_interp.cli.ship import main

    sys.exit(main())
