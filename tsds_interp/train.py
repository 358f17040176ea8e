"""Pretraining, reflective SFT and RL loops; presets; checkpoints and exact resume; the CLI.

``python -m tsds_interp.train {pretrain,sft,rl,pipeline} --preset {tiny,small} --out DIR``

A stage folder holds ``log.jsonl`` (one JSON row per logged step), ``metrics.csv`` (held-out DS
metrics of the final model), ``run.json`` and ``checkpoint/`` (model, config, optimizer state and
step, written atomically; loadable by :func:`tsds_interp.model.load`). Every random draw is a
function of ``(seed, step)``, so a resumed run gives bit-identical weights on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from tsds_interp import checks, cli
from tsds_interp.data import reflective_sft_data, solution_batch, verification_data
from tsds_interp.forward import fast_forward, refusal
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import (
    CheckpointError,
    ModelConfig,
    apply_umask,
    autocast,
    build_model,
    checkpoint_config,
    config_of,
    grow,
    load,
    read_config,
    recover_dir,
    replace_dir,
    run_versions,
    write_checkpoint_files,
)
from tsds_interp.objectives import (
    WEIGHTINGS,
    advantages,
    discounted_reward,
    kl_terms,
    policy_gradient_terms,
    sft_terms,
    token_logprobs,
)
from tsds_interp.rollout import rollout
from tsds_interp.task import (
    DECISION,
    PAD,
    PADDING,
    SAMPLE,
    TaskConfig,
    rejected_candidate_tokens,
    sample_questions,
    token_roles,
)

STAGES = ("pretrain", "sft", "rl")


@dataclass(frozen=True)
class TrainConfig:
    """One stage's settings. Fields a stage does not use are ignored by it."""

    stage: str = "pretrain"
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_questions: int = 512
    eval_temperature: float = 1.0
    ckpt_every: int = 250
    # model (pretrain only)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    width: int = 3
    budget: int = 3
    train_cells: str = "1x1,1x2,2x1,2x2,1x3,3x1,2x3,3x2"
    ood_cells: str = "3x3"
    task_format: str = "oneshot"  # "steps": reflective calls over reduced states
    # reflective SFT
    sft_questions: int = 8192
    first_right_fraction: float = 0.5
    sft_mix: str = "fixed"  # "natural": keep the model's own first-attempt accuracy per cell
    sft_temperature: float = 1.0  # temperature of the model's own candidates in the SFT data
    rejected_samples: str = "train"  # "skip": train the REJECT after a wrong candidate, not the candidate
    verify_questions: int = 0  # questions that add paired verification rows (right + own wrong)
    add_layers: int = 0  # sft: grow the --init model by this many function-preserving blocks on top
    weighting: str = "token_mean"
    decision_share: float = 0.5
    # RL
    questions_per_step: int = 32
    group: int = 8
    ppo_epochs: int = 1
    clip_eps: float = 0.1
    beta: float = 0.1
    kl_estimator: str = "k3"
    advantage: str = "grpo"
    discount: float = 1.0
    temperature: float = 1.0
    rl_rejected_samples: str = "train"  # "mask": no policy gradient on rejected steps' tokens (steps)
    device: str = "cpu"
    autocast: str = "none"  # "bf16": bfloat16 autocast for forward passes (training and rollouts)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name, (lo, hi) in INT_RANGES.items():
            lo = 2 if name == "group" and self.advantage == "grpo" and self.stage == "rl" else lo
            checks.number(_setting(name), getattr(self, name), lo=lo, hi=hi, integer=True)
        for name, (lo, hi, lo_open) in REAL_RANGES.items():
            checks.number(_setting(name), getattr(self, name), lo=lo, hi=hi, lo_open=lo_open)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_setting(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        checks.device(self.device, _setting("device"))
        self.model_config()  # validates the model sizes and the task settings

    def task(self) -> TaskConfig:
        try:
            cells = {k: tuple(tuple(int(x) for x in c.split("x")) for c in getattr(self, k).split(",") if c)
                     for k in ("train_cells", "ood_cells")}
        except (ValueError, AttributeError):
            raise ValueError(f"--train-cells and --ood-cells are comma-separated AxB cells such as 1x2,2x1; "
                             f"got {self.train_cells!r} and {self.ood_cells!r}") from None
        try:
            return TaskConfig(width=self.width, budget=self.budget, task_format=self.task_format, **cells)
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad task settings: {e}") from None

    def model_config(self) -> ModelConfig:
        task = self.task()
        try:
            return ModelConfig(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                               d_mlp=self.d_mlp, seed=self.seed, task=task)
        except ValueError as e:
            raise ValueError(f"bad model settings: {e}") from None


def _setting(name: str) -> str:
    """How the CLI spells a setting, with its library name: ``grad_clip (--grad-clip)``."""
    return f"{name} (--{name.replace('_', '-')})"


# Accepted values of every setting (the model sizes and task are checked by ModelConfig/TaskConfig).
INT_RANGES = {"steps": (1, 10**8), "batch_size": (1, 2**20), "warmup": (0, 10**8), "seed": (0, checks.MAX_SEED),
              "log_every": (1, 10**8), "eval_every": (1, 10**8), "ckpt_every": (1, 10**8),
              "eval_questions": (1, 10**6), "sft_questions": (1, 10**8), "verify_questions": (0, 10**8),
              "add_layers": (0, 256), "questions_per_step": (1, 2**20), "group": (1, 2**12),
              "ppo_epochs": (1, 100)}
REAL_RANGES = {"lr": (0, 10, True), "weight_decay": (0, 10, False), "grad_clip": (0, 1e6, True),
               "eval_temperature": (0, 100, False), "first_right_fraction": (0, 1, False),
               "sft_temperature": (0, 100, True), "decision_share": (0, 1, False), "clip_eps": (0, 10, True),
               "beta": (0, 1e3, False), "discount": (0, 1, True), "temperature": (0, 100, True)}
CHOICES = {"weighting": WEIGHTINGS, "kl_estimator": ("k1", "k3"), "autocast": ("none", "bf16"),
           "sft_mix": ("fixed", "natural"), "rejected_samples": ("train", "skip"),
           "advantage": ("grpo", "reinforce"), "task_format": ("oneshot", "steps"),
           "rl_rejected_samples": ("train", "mask")}
# Settings a resumed run may change; any other difference would not continue the same run.
RESUME_MAY_CHANGE = ("steps", "log_every", "eval_every", "ckpt_every", "eval_questions", "eval_temperature",
                     "device")


_TINY_MODEL = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128, width=2, budget=2,
                   train_cells="1x1,1x2,2x1", ood_cells="2x2", eval_questions=256, log_every=10,
                   eval_every=50, ckpt_every=50)
_PAPER_MODEL = dict(n_layers=5, d_model=256, n_heads=8, d_mlp=1024, width=6, budget=3, eval_questions=2048,
                    train_cells=",".join(f"{i}x{j}" for i in range(1, 6) for j in range(1, 6)), ood_cells="6x6")
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "pretrain": dict(_TINY_MODEL, steps=300, batch_size=64, lr=3e-3, warmup=20),
        "sft": dict(_TINY_MODEL, steps=100, batch_size=64, lr=1e-3, warmup=10, sft_questions=1024),
        "rl": dict(_TINY_MODEL, steps=30, lr=5e-4, warmup=3, questions_per_step=16, group=4,
                   eval_every=15, ckpt_every=15, log_every=5),
    },
    # For one GPU: a 5-layer, d_model 256 model (about 4M parameters) on up to 5x5-digit products.
    "paper": {
        "pretrain": dict(_PAPER_MODEL, steps=20000, batch_size=512, lr=1e-3, warmup=500, eval_every=2000,
                         ckpt_every=1000, log_every=100),
        "sft": dict(_PAPER_MODEL, steps=3000, batch_size=512, lr=3e-4, warmup=100, sft_questions=65536,
                    eval_every=500, ckpt_every=500, log_every=50),
        "rl": dict(_PAPER_MODEL, steps=1000, lr=1e-4, warmup=20, questions_per_step=128, group=8,
                   eval_every=100, ckpt_every=50, log_every=10),
    },
    "small": {
        "pretrain": dict(steps=3000, batch_size=256, lr=2e-3, warmup=100, eval_every=500,
                         ckpt_every=250, log_every=50),
        "sft": dict(steps=600, batch_size=256, lr=5e-4, warmup=30, sft_questions=16384,
                    eval_every=200, ckpt_every=200, log_every=20),
        "rl": dict(steps=200, lr=2e-4, warmup=10, questions_per_step=32, group=8, eval_every=50,
                   ckpt_every=25, log_every=5),
    },
}
# The step format (reduced states, one call per digit of y). steps_small: in-distribution up to 4x4 digits,
# 5x5 out of distribution, the 4-layer d_model 128 model of "small"; SFT on the model's own steps
# labelled by the checker with paired verification rows (same state, right and wrong step), rejected
# steps not imitated, decision and sample tokens half of the loss each; RL with one outcome reward per
# episode. (Decision share 0.8 at lr 1e-3 cost the sampler a quarter of its step accuracy: see README.)
_STEPS_TINY = dict(_TINY_MODEL, task_format="steps", eval_questions=128, eval_every=1000, ckpt_every=1000)
_STEPS_SMALL = dict(task_format="steps", width=5, budget=3, ood_cells="5x5",
                    train_cells=",".join(f"{i}x{j}" for i in range(1, 5) for j in range(1, 5)))
_STEPS_SFT = dict(sft_mix="natural", rejected_samples="skip", weighting="role_balanced", decision_share=0.5,
                  sft_temperature=1.0)
PRESETS["steps_tiny"] = {
    "pretrain": dict(PRESETS["tiny"]["pretrain"], **_STEPS_TINY),
    "sft": dict(PRESETS["tiny"]["sft"], **{**_STEPS_TINY, **_STEPS_SFT, "sft_questions": 512, "verify_questions": 256}),
    "rl": dict(PRESETS["tiny"]["rl"], **{**_STEPS_TINY, "steps": 20}),
}
PRESETS["steps_small"] = {
    "pretrain": dict(_STEPS_SMALL, steps=600, batch_size=256, lr=2e-3, warmup=50, eval_every=200,
                     ckpt_every=250, log_every=50),
    "sft": dict(_STEPS_SMALL, **_STEPS_SFT, steps=1000, batch_size=256, lr=3e-4, warmup=30, sft_questions=16384,
                verify_questions=32768, eval_every=200, ckpt_every=200, log_every=20),
    "rl": dict(_STEPS_SMALL, steps=150, lr=2e-4, warmup=10, questions_per_step=32, group=8, eval_every=50,
               ckpt_every=25, log_every=5),
}
PRESETS["steps_paper"] = {stage: dict(cfg, task_format="steps", **(_STEPS_SFT if stage == "sft" else {}))
                          for stage, cfg in PRESETS["paper"].items()}
PRESETS["steps_paper"]["sft"]["verify_questions"] = 131072

# The small preset with the reflective-SFT recipe whose decision checks (some) candidates: the model's
# natural accuracy per cell, rejected candidates not imitated, paired verification rows, decision
# tokens given 0.8 of the loss at twice the learning rate. Pretraining and RL are those of "small".
PRESETS["small_verify"] = {**PRESETS["small"], "sft": dict(
    PRESETS["small"]["sft"], sft_mix="natural", rejected_samples="skip", verify_questions=16384,
    weighting="role_balanced", decision_share=0.8, lr=1e-3)}


def preset_config(preset: str, stage: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(stage=stage, **{**PRESETS[preset][stage], **overrides})


# ---------------------------------------------------------------- optimizer state as safetensors

def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW, with the fused (one kernel for all parameters) implementation."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ---------------------------------------------------------------- the trainer

class _StopRequested:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31)


class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one).

    A global batch is split into contiguous per-rank shards; every loss is normalised by global
    token counts (``sum``), so the per-rank losses add up to the single-process loss and the
    summed gradients equal its gradient. Backend gloo on CPU, nccl on CUDA.
    """

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (differentiable only through this rank's term, as gradients are)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        dist.all_reduce(y)
        return x + (y - x.detach())

    def shard(self, n: int, what: str) -> slice:
        if n % self.world:
            raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, init: str | Path | None = None,
                 ref: str | Path | None = None, quiet: bool = False):
        self.dist = Dist(cfg.device)
        if self.dist.device != cfg.device:
            cfg = dataclasses.replace(cfg, device=self.dist.device)
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet or not self.dist.main
        if cfg.stage == "pretrain":
            self.model = build_model(cfg.model_config(), device=cfg.device)
        else:
            if init is None:
                raise ValueError(f"the {cfg.stage} stage starts from a model: pass --init CHECKPOINT")
            self.model = load(init, device=cfg.device)
            if cfg.stage == "sft" and cfg.add_layers:
                self.model = grow(self.model, cfg.add_layers, seed=cfg.seed)
        self.task = config_of(self.model).task
        self.ref = load(ref or init, device=cfg.device) if cfg.stage == "rl" else None
        if self.ref is not None:
            if config_of(self.ref).task != self.task:
                raise ValueError(f"the KL reference {ref or init} was trained on another task "
                                 f"({config_of(self.ref).task}) than the model ({self.task}); pass a --ref "
                                 "of the same task")
            self.ref.requires_grad_(False)
        if cfg.stage == "rl":
            self.dist.shard(cfg.questions_per_step, "--questions-per-step")
        else:
            self.dist.shard(cfg.batch_size, "--batch-size")
        self.forward = fast_forward(self.model, "training")  # own weights where exact, else hooked
        self.ref_forward = fast_forward(self.ref, "reference") if self.ref is not None else None
        self.net = DDP(self.forward) if self.dist.world > 1 else self.forward
        self.updates_per_step = cfg.ppo_epochs if cfg.stage == "rl" else 1
        total = cfg.steps * self.updates_per_step
        self.opt = adamw(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, total))
        self.step = 0
        self.eval_q = sample_questions(self.task, "test", cfg.eval_questions, seed=10_007)
        self.sft_data = None
        self.init, self.ref_path = init, ref

    # -- state
    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=self.out))
        try:
            write_checkpoint_files(self.model, tmp, extra={"train": dataclasses.asdict(self.cfg),
                                                           "step": self.step})
            save_file(_optimizer_tensors(self.opt), str(tmp / "optimizer.safetensors"))
            save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "train_state.json").write_text(json.dumps(
                {"step": self.step, "scheduler_last_epoch": self.sched.last_epoch}))
            replace_dir(tmp, self.ckpt)
        except FloatingPointError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the last checkpoint in {self.ckpt} is kept" if self.ckpt.exists() else "no checkpoint was written"
            raise FloatingPointError(f"at step {self.step} {e}: {kept}; lower --lr or --grad-clip and "
                                     "resume from it") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def resume(self) -> None:
        """Continue from ``checkpoint/`` (which :func:`check_stage_folder` found there)."""
        saved = read_config(self.ckpt).get("train", {})
        if saved.get("stage") != self.cfg.stage:
            raise CheckpointError(f"{self.ckpt} is a {saved.get('stage')!r} checkpoint, not "
                                  f"{self.cfg.stage!r}; resume with the stage that wrote it")
        now = dataclasses.asdict(self.cfg)
        changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
        if changed:
            k = changed[0]
            raise CheckpointError(f"--{k.replace('_', '-')} is {now[k]!r} but {self.ckpt} was trained with "
                                  f"{saved[k]!r}; resume with the settings that wrote it (only "
                                  f"{', '.join('--' + c.replace('_', '-') for c in RESUME_MAY_CHANGE)} may change)")
        model = load(self.ckpt, device=self.cfg.device)
        self.model.load_state_dict(model.state_dict())
        try:
            _load_optimizer_tensors(self.opt, load_file(str(self.ckpt / "optimizer.safetensors")))
            rng = load_file(str(self.ckpt / "rng.safetensors"))["torch_rng"]
            state = checks.read_json(self.ckpt / "train_state.json", "training state")
            step, last_epoch = int(state["step"]), int(state["scheduler_last_epoch"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{self.ckpt} has a damaged optimizer, random or training state "
                                  f"({_first_line(e)}); start again without --resume in a new --out") from None
        self.step = step
        self.sched.last_epoch = last_epoch
        for group, base_lr, f in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            group["lr"] = base_lr * f(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        torch.set_rng_state(rng)
        if self.dist.main:
            self._trim_log()

    def _trim_log(self) -> None:
        """Keep the log rows up to the checkpoint's step; a torn (half-written) row is dropped."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        rows = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                rows.append(line)
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(log)

    # -- one step
    def _batch_tokens(self) -> torch.Tensor:
        cfg = self.cfg
        if cfg.stage == "pretrain":
            batch = solution_batch(self.task, cfg.batch_size, _step_seed(cfg.seed, self.step))
        else:
            n = len(self.sft_data)
            steps_per_epoch = max(1, n // cfg.batch_size)
            epoch, i = divmod(self.step, steps_per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, epoch, 1)))
            batch = self.sft_data[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
        return batch[self.dist.shard(len(batch), "the batch")]

    def _sft_terms(self, tokens):
        tokens = tokens[:, : int((tokens != PAD).sum(1).max())]  # drop all-PAD columns
        logp, ent = token_logprobs(self.net, tokens.to(self.cfg.device))
        roles = token_roles(tokens, self.task).to(self.cfg.device)
        weighting = "token_mean" if self.cfg.stage == "pretrain" else self.cfg.weighting
        skip = None
        if self.cfg.stage == "sft" and self.cfg.rejected_samples == "skip":
            skip = rejected_candidate_tokens(tokens.to(roles.device), self.task, roles)
        terms = sft_terms(logp, roles, weighting, self.cfg.decision_share, total=self.dist.sum, skip=skip)
        return terms, {"entropy": _mean_counted(ent, roles, self.dist.sum)}

    def _rl_batch(self):
        cfg = self.cfg
        q = sample_questions(self.task, "train", cfg.questions_per_step, _step_seed(cfg.seed, self.step))
        q = q.repeat_interleave(cfg.group)
        self.model.eval()
        r = rollout(self.model, q, task=self.task, temperature=cfg.temperature,
                    seed=_step_seed(cfg.seed, self.step, 2), rows=self.dist.shard(len(q), "the rollout batch"))
        tokens, roles = r.tokens.to(cfg.device), r.roles.to(cfg.device)
        with torch.no_grad():
            old_logp, _ = token_logprobs(self.forward, tokens)
            ref_logp, _ = token_logprobs(self.ref_forward, tokens)
        retries = r.n_attempts - (r.n_calls - 1 if self.task.steps else 0)  # 1 when nothing was rejected
        reward = discounted_reward(r.reward, retries, cfg.discount).to(cfg.device)
        adv = advantages(reward, cfg.group, cfg.advantage)
        if self.task.steps:  # every attempt of an episode shares its outcome's advantage
            adv = adv[r.episode.to(cfg.device)]
            if cfg.rl_rejected_samples == "mask":
                roles = roles.masked_fill(rejected_candidate_tokens(tokens, self.task, roles), PADDING)
        n = len(q)
        return tokens, roles, old_logp, ref_logp, adv, {
            "reward": self.dist.sum(r.reward.sum()).item() / n,
            "attempts": self.dist.sum(r.n_attempts.float().sum()).item() / n}

    def _rl_terms(self, batch):
        tokens, roles, old_logp, ref_logp, adv, info = batch
        cfg = self.cfg
        logp, ent = token_logprobs(self.net, tokens)
        pg = policy_gradient_terms(logp, old_logp, roles, adv, clip=cfg.clip_eps, total=self.dist.sum)
        kl = kl_terms(logp, ref_logp, roles, beta=1.0, estimator=cfg.kl_estimator, total=self.dist.sum)
        total = pg + dataclasses.replace(kl, values=kl.values * cfg.beta)
        info = {**info, "pg_loss": self.dist.sum(pg.loss).item(), "kl": self.dist.sum(kl.loss).item(),
                "entropy": _mean_counted(ent, roles, self.dist.sum)}
        return total, info

    def _update(self, terms, log: bool) -> dict:
        self.model.train()
        info = {}
        params = list(self.model.parameters())
        if log:  # gradient norm reaching each role, from the exact role split of the loss
            for name, role in (("sample", SAMPLE), ("decision", DECISION)):
                grads = torch.autograd.grad(terms.role_loss(role), params, retain_graph=True, allow_unused=True)
                flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
                info[f"grad_norm_{name}"] = float(self.dist.sum(flat).norm())
        loss = terms.loss
        global_loss = self.dist.sum(loss.detach())
        if not torch.isfinite(global_loss):
            raise FloatingPointError(f"loss is {global_loss.item()} at step {self.step}; lower --lr or "
                                     "--grad-clip and resume from the last checkpoint")
        self.opt.zero_grad(set_to_none=True)
        (loss * self.dist.world).backward()  # DDP averages gradients over ranks; the loss parts add up
        info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        self.model.eval()
        return {"loss": global_loss.item(), "loss_sample": self.dist.sum(terms.role_loss(SAMPLE).detach()).item(),
                "loss_decision": self.dist.sum(terms.role_loss(DECISION).detach()).item(), **info}

    def autocast(self):
        """bfloat16 autocast on the configured device when ``autocast == 'bf16'`` (else a no-op)."""
        return autocast(self.cfg.device, self.cfg.autocast)

    def train_step(self) -> dict:
        with self.autocast():
            return self._train_step()

    def _train_step(self) -> dict:
        log = (self.step + 1) % self.cfg.log_every == 0
        if self.cfg.stage == "rl":
            batch = self._rl_batch()
            for epoch in range(self.cfg.ppo_epochs):
                terms, extra = self._rl_terms(batch)
                info = self._update(terms, log and epoch == 0)
        else:
            terms, extra = self._sft_terms(self._batch_tokens())
            info = self._update(terms, log)
        return {**info, **extra, "lr": self.sched.get_last_lr()[0]}

    def evaluate(self) -> pd.DataFrame:  # noqa: F821
        return ds_metrics(rollout(self.model, self.eval_q, task=self.task,
                                  temperature=self.cfg.eval_temperature, seed=99))

    # -- the loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> Path:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` steps, as an interrupt would)."""
        cfg = self.cfg
        check_stage_folder(self.out, resume)
        if resume:
            self.resume()
        main = self.dist.main
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.stage == "sft":
            self.sft_data = self._load_or_build_sft_data()
        if main:
            (self.out / "run.json").write_text(json.dumps(
                {"config": dataclasses.asdict(cfg), "init": str(self.init), "ref": str(self.ref_path),
                 "forward": "own weights" if self.forward is not self.model else f"hooked ({refusal(self.model)})",
                 "world_size": self.dist.world, "versions": run_versions()}, indent=2))
        start_time = time.time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, disable=self.quiet)
        log = open(self.out / "log.jsonl", "a") if main else None
        try:
            with _StopRequested() as stop:
                while self.step < cfg.steps:
                    info = self.train_step()
                    self.step += 1
                    bar.update(1)
                    row = {"step": self.step, **info} if self.step % cfg.log_every == 0 else None
                    if main and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                        m = self.evaluate().query("cell == 'all'").set_index("metric")["value"]
                        row = {"step": self.step, **info, **{f"eval_{k}": float(v) for k, v in m.items()}}
                    if row is not None and main:
                        row["elapsed_s"] = time.time() - start_time
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        bar.set_postfix({k: round(v, 3) for k, v in row.items()
                                         if k in ("loss", "reward", "eval_realized_accuracy")})
                    flag = stop.flag or (stop_after is not None and self.step >= stop_after)
                    interrupted = bool(self.dist.sum(torch.tensor(float(flag))) > 0)  # every rank stops together
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or interrupted:
                        self.save()
                    if interrupted and self.step < cfg.steps:
                        raise Interrupted(f"stopped at step {self.step}; checkpoint saved in {self.ckpt}, "
                                          "continue with --resume")
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main:
            self.evaluate().to_csv(self.out / "metrics.csv", index=False)
        if self.dist.world > 1:
            dist.barrier()  # the next stage reads what rank 0 wrote
        return self.ckpt

    def _load_or_build_sft_data(self) -> torch.Tensor:
        path = self.out / "sft_data.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["tokens"]
            except (SafetensorError, OSError, KeyError) as e:
                raise CheckpointError(f"{path} is damaged ({_first_line(e)}); delete it and it is rebuilt") from None
        cfg = self.cfg
        data = reflective_sft_data(self.model, self.task, cfg.sft_questions, seed=cfg.seed,
                                   first_right_fraction=cfg.first_right_fraction, mix=cfg.sft_mix,
                                   temperature=cfg.sft_temperature)
        if cfg.verify_questions:
            pairs = verification_data(self.model, self.task, cfg.verify_questions, seed=cfg.seed,
                                      temperature=cfg.sft_temperature)
            data = torch.cat([data, pairs])[torch.randperm(len(data) + len(pairs),
                                                           generator=torch.Generator().manual_seed(cfg.seed))]
        if not self.dist.main:  # every rank builds the same data; one writes it
            return data
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": data}, str(tmp))
        apply_umask(tmp)
        tmp.rename(path)
        return data


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _mean_counted(x: torch.Tensor, roles: torch.Tensor, total=lambda t: t) -> float:
    """Mean of ``x`` over sample and decision tokens (of all ranks, with ``total = Dist.sum``)."""
    mask = (roles == SAMPLE) | (roles == DECISION)
    return float(total((x.detach() * mask).sum()) / total(mask.sum()).clamp(min=1))


def train_stage(cfg: TrainConfig, out, init=None, ref=None, resume=False, quiet=False,
                stop_after=None) -> Path:
    """Run one stage; returns its checkpoint folder."""
    return Trainer(cfg, out, init=init, ref=ref, quiet=quiet).run(resume=resume, stop_after=stop_after)


def pipeline(preset: str, out, quiet: bool = False, resume: bool = False, **overrides
             ) -> dict[str, Path]:
    """pretrain -> reflective SFT -> RL, in ``out/base``, ``out/sft``, ``out/rl``."""
    out = Path(out)
    paths = {}
    configs = {stage: preset_config(preset, stage, **overrides) for stage in STAGES}  # all checked first
    for stage, name, init, ref in (("pretrain", "base", None, None), ("sft", "sft", "base", None),
                                   ("rl", "rl", "sft", "sft")):
        cfg = configs[stage]
        folder = out / name
        done = (folder / "metrics.csv").is_file()
        if not done:
            t0 = time.time()
            train_stage(cfg, folder, init=paths.get(init), ref=paths.get(ref),
                        resume=resume and (folder / "checkpoint").exists(), quiet=quiet)
            if int(os.environ.get("RANK", "0")) == 0:
                (folder / "wall_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        paths[name] = folder / "checkpoint"
    return paths


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = cli.Parser("python -m tsds_interp.train", __doc__.split("\n\n")[0])
    p.add_argument("stage", choices=(*STAGES, "pipeline"))
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--out", required=True, type=cli.out_dir, help="stage folder (pipeline: parent of base/sft/rl)")
    p.add_argument("--init", help="checkpoint to start sft/rl from (folder or shipped name)")
    p.add_argument("--ref", help="reference model for the RL KL penalty (default: --init)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None
                       else str, default=None, help=f"(preset value; dataclass default {f.default})")
    return p


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


def _train(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "stage" and getattr(args, f.name) is not None}
    if args.stage == "pipeline":
        for stage in STAGES:
            preset_config(args.preset, stage, **overrides)
    else:
        cfg = preset_config(args.preset, args.stage, **overrides)
        if cfg.stage != "pretrain" and args.init is None:
            raise ValueError(f"the {cfg.stage} stage starts from a model: pass --init CHECKPOINT")
        for flag, name in (("--init", args.init), ("--ref", args.ref)):
            if name is not None:
                try:
                    checkpoint_config(name)
                except CheckpointError as e:
                    raise CheckpointError(f"{flag}: {e}") from None
        check_stage_folder(args.out, args.resume)
    try:
        if args.stage == "pipeline":
            paths = pipeline(args.preset, args.out, quiet=args.quiet, resume=args.resume, **overrides)
            text = "\n".join(f"{k}: {v}" for k, v in paths.items())
        else:
            ckpt = train_stage(cfg, args.out, init=args.init, ref=args.ref, resume=args.resume, quiet=args.quiet)
            text = f"checkpoint: {ckpt}"
    except Interrupted as e:
        cli.say(str(e))
        return cli.EXIT_INTERRUPTED
    if cli.is_main_process():
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return cli.main(_parser(), _train, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
