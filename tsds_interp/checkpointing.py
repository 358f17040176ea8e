"""The files of a training stage folder and the rules that keep them consistent.

A stage folder holds ``checkpoint/`` (model, config, optimizer state, random state and step,
replaced atomically so a kill never leaves half a checkpoint), ``log.jsonl`` (one JSON row per
logged step), ``run.json``, ``metrics.csv`` and, for SFT, ``sft_data.safetensors`` (the data built
once from the initial model). A run resumes only with the settings that wrote it (a few, such as
``--steps``, may change), and the log is cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tsds_interp import checks
from tsds_interp.model import (
    CheckpointError,
    apply_umask,
    load,
    read_config,
    recover_dir,
    replace_dir,
    write_checkpoint_files,
)

# Settings a resumed run may change; any other difference would not continue the same run.
RESUME_MAY_CHANGE = ("steps", "log_every", "eval_every", "ckpt_every", "eval_questions", "eval_temperature",
                     "device")


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half; a
    second signal (e.g. Ctrl-C again during a long evaluation) stops at once, keeping the last checkpoint."""
    def __init__(self):
        self.flag = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, *_):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class FolderLock:
    """``OUT/.lock`` holding this process's pid while it writes into ``OUT`` (training, or a tool's
    results): a second writer to the same folder is refused with the holder's pid; a lock left by a
    process that no longer runs is taken over."""

    def __init__(self, out: Path, enabled: bool = True, doing: str = "trained into"):
        self.path, self.enabled, self.doing = Path(out) / ".lock", enabled, doing

    def __enter__(self):
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.path)
                if holder is not None:
                    raise ValueError(f"{self.path.parent} is being {self.doing} by another process (pid {holder}); "
                                     "wait for it to finish or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ValueError(f"could not take the lock {self.path}; remove it if nothing writes there")

    def __exit__(self, *exc):
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> int | None:
    """The pid in a lock file if that process still runs (and is not this one), else None."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def check_stage_folder(out: Path, resume: bool) -> None:
    """A new stage needs a folder without a checkpoint; ``--resume`` needs one."""
    ckpt = Path(out) / "checkpoint"
    recover_dir(ckpt)
    if resume and not (ckpt / "train_state.json").is_file():
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint/train_state.json "
                              "(run without --resume to start)")
    if not resume and ckpt.exists():
        raise CheckpointError(f"{out} already holds a checkpoint; pass --resume to continue it or "
                              "choose another --out")


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named tensors (safetensors holds no nesting)."""
    return {f"{i}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for i, state in opt.state_dict()["state"].items() for k, v in state.items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_training_checkpoint(ckpt: Path, model, opt, sched, step: int, train_config) -> None:
    """Write model, optimizer, random and step state to ``ckpt``, replacing it atomically; a model
    with non-finite weights is refused and the previous checkpoint kept."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=ckpt.parent))
    try:
        write_checkpoint_files(model, tmp, extra={"train": dataclasses.asdict(train_config), "step": step})
        save_file(optimizer_tensors(opt), str(tmp / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "scheduler_last_epoch": sched.last_epoch}))
        replace_dir(tmp, ckpt)
    except FloatingPointError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the last checkpoint in {ckpt} is kept" if ckpt.exists() else "no checkpoint was written"
        raise FloatingPointError(f"at step {step} {e}: {kept}; lower --lr or --grad-clip and "
                                 "resume from it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_resumable(ckpt: Path, train_config) -> None:
    """The checkpoint was written by the same stage with the same settings (bar ``RESUME_MAY_CHANGE``)."""
    saved = read_config(ckpt).get("train", {})
    if saved.get("stage") != train_config.stage:
        raise CheckpointError(f"{ckpt} is a {saved.get('stage')!r} checkpoint, not "
                              f"{train_config.stage!r}; resume with the stage that wrote it")
    now = dataclasses.asdict(train_config)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise CheckpointError(f"--{k.replace('_', '-')} is {now[k]!r} but {ckpt} was trained with "
                              f"{saved[k]!r}; resume with the settings that wrote it (only "
                              f"{', '.join('--' + c.replace('_', '-') for c in RESUME_MAY_CHANGE)} may change)")


def restore_training_checkpoint(ckpt: Path, model, opt, sched) -> int:
    """Load weights, optimizer, schedule and random state from ``ckpt``; returns its step."""
    model.load_state_dict(load(ckpt, device=next(model.parameters()).device).state_dict())
    try:
        load_optimizer_tensors(opt, load_file(str(ckpt / "optimizer.safetensors")))
        rng = load_file(str(ckpt / "rng.safetensors"))["torch_rng"]
        state = checks.read_json(ckpt / "train_state.json", "training state")
        step, last_epoch = int(state["step"]), int(state["scheduler_last_epoch"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt} has a damaged optimizer, random or training state "
                              f"({first_line(e)}); start again without --resume in a new --out") from None
    sched.last_epoch = last_epoch
    for group, base_lr, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base_lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    torch.set_rng_state(rng)
    return step


def trim_log(log: Path, step: int) -> None:
    """Keep the log rows up to ``step``; a torn (half-written) row is dropped."""
    if not log.is_file():
        return
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(log)


def cached_tokens(path: Path, build: Callable[[], torch.Tensor], write: bool = True) -> torch.Tensor:
    """The token tensor stored at ``path``, or ``build()`` written there (atomically) for next time."""
    if path.is_file():
        try:
            return load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError) as e:
            raise CheckpointError(f"{path} is damaged ({first_line(e)}); delete it and it is rebuilt") from None
    data = build()
    if write:
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": data}, str(tmp))
        apply_umask(tmp)
        tmp.rename(path)
    return data


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
