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
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tsds_interp.data import reflective_sft_data, solution_batch
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import (
    CheckpointError,
    ModelConfig,
    build_model,
    config_of,
    load,
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
from tsds_interp.task import DECISION, PAD, SAMPLE, TaskConfig, sample_questions, token_roles

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
    # reflective SFT
    sft_questions: int = 8192
    first_right_fraction: float = 0.5
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
    device: str = "cpu"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "eval_questions",
                     "questions_per_step", "group", "ppo_epochs", "sft_questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.advantage not in ("grpo", "reinforce"):
            raise ValueError(f"advantage must be grpo or reinforce, got {self.advantage!r}")
        self.task()  # validates cells

    def task(self) -> TaskConfig:
        parse = lambda s: tuple(tuple(int(x) for x in c.split("x")) for c in s.split(",") if c)
        try:
            return TaskConfig(width=self.width, budget=self.budget, train_cells=parse(self.train_cells),
                              ood_cells=parse(self.ood_cells))
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad task settings: {e}") from None

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                           d_mlp=self.d_mlp, seed=self.seed, task=self.task())


_TINY_MODEL = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128, width=2, budget=2,
                   train_cells="1x1,1x2,2x1", ood_cells="2x2", eval_questions=256, log_every=10,
                   eval_every=50, ckpt_every=50)
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "pretrain": dict(_TINY_MODEL, steps=300, batch_size=64, lr=3e-3, warmup=20),
        "sft": dict(_TINY_MODEL, steps=100, batch_size=64, lr=1e-3, warmup=10, sft_questions=1024),
        "rl": dict(_TINY_MODEL, steps=30, lr=5e-4, warmup=3, questions_per_step=16, group=4,
                   eval_every=15, ckpt_every=15, log_every=5),
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


def preset_config(preset: str, stage: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(stage=stage, **{**PRESETS[preset][stage], **overrides})


# ---------------------------------------------------------------- optimizer state as safetensors

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


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, init: str | Path | None = None,
                 ref: str | Path | None = None, quiet: bool = False):
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet
        if cfg.stage == "pretrain":
            self.model = build_model(cfg.model_config(), device=cfg.device)
        else:
            if init is None:
                raise ValueError(f"the {cfg.stage} stage starts from a model: pass --init CHECKPOINT")
            self.model = load(init, device=cfg.device)
        self.task = config_of(self.model).task
        self.ref = load(ref or init, device=cfg.device) if cfg.stage == "rl" else None
        if self.ref is not None:
            self.ref.requires_grad_(False)
        self.updates_per_step = cfg.ppo_epochs if cfg.stage == "rl" else 1
        total = cfg.steps * self.updates_per_step
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def resume(self) -> None:
        if not (self.ckpt / "train_state.json").is_file():
            raise CheckpointError(f"nothing to resume in {self.out}: no checkpoint/train_state.json "
                                  "(run without --resume to start)")
        saved = json.loads((self.ckpt / "config.json").read_text()).get("train", {})
        if saved.get("stage") != self.cfg.stage:
            raise CheckpointError(f"{self.ckpt} is a {saved.get('stage')!r} checkpoint, not "
                                  f"{self.cfg.stage!r}; resume with the stage that wrote it")
        model = load(self.ckpt, device=self.cfg.device)
        self.model.load_state_dict(model.state_dict())
        _load_optimizer_tensors(self.opt, load_file(str(self.ckpt / "optimizer.safetensors")))
        state = json.loads((self.ckpt / "train_state.json").read_text())
        self.step = state["step"]
        self.sched.last_epoch = state["scheduler_last_epoch"]
        for group, base_lr, f in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            group["lr"] = base_lr * f(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        torch.set_rng_state(load_file(str(self.ckpt / "rng.safetensors"))["torch_rng"])
        log = self.out / "log.jsonl"
        if log.is_file():  # drop rows logged after the checkpoint
            rows = [r for r in log.read_text().splitlines() if json.loads(r)["step"] <= self.step]
            log.write_text("".join(r + "\n" for r in rows))

    # -- one step
    def _batch_tokens(self) -> torch.Tensor:
        cfg = self.cfg
        if cfg.stage == "pretrain":
            return solution_batch(self.task, cfg.batch_size, _step_seed(cfg.seed, self.step))
        n = len(self.sft_data)
        steps_per_epoch = max(1, n // cfg.batch_size)
        epoch, i = divmod(self.step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, epoch, 1)))
        return self.sft_data[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]

    def _sft_terms(self, tokens):
        tokens = tokens[:, : int((tokens != PAD).sum(1).max())]  # drop all-PAD columns
        logp, ent = token_logprobs(self.model, tokens.to(self.cfg.device))
        roles = token_roles(tokens, self.task).to(self.cfg.device)
        weighting = "token_mean" if self.cfg.stage == "pretrain" else self.cfg.weighting
        return sft_terms(logp, roles, weighting, self.cfg.decision_share), {"entropy": _mean_counted(ent, roles)}

    def _rl_batch(self):
        cfg = self.cfg
        q = sample_questions(self.task, "train", cfg.questions_per_step, _step_seed(cfg.seed, self.step))
        q = q.repeat_interleave(cfg.group)
        self.model.eval()
        r = rollout(self.model, q, task=self.task, temperature=cfg.temperature,
                    seed=_step_seed(cfg.seed, self.step, 2))
        tokens, roles = r.tokens.to(cfg.device), r.roles.to(cfg.device)
        with torch.no_grad():
            old_logp, _ = token_logprobs(self.model, tokens)
            ref_logp, _ = token_logprobs(self.ref, tokens)
        reward = discounted_reward(r.reward, r.n_attempts, cfg.discount).to(cfg.device)
        adv = advantages(reward, cfg.group, cfg.advantage)
        return tokens, roles, old_logp, ref_logp, adv, {"reward": r.reward.mean().item(),
                                                        "attempts": r.n_attempts.float().mean().item()}

    def _rl_terms(self, batch):
        tokens, roles, old_logp, ref_logp, adv, info = batch
        cfg = self.cfg
        logp, ent = token_logprobs(self.model, tokens)
        pg = policy_gradient_terms(logp, old_logp, roles, adv, clip=cfg.clip_eps)
        kl = kl_terms(logp, ref_logp, roles, beta=1.0, estimator=cfg.kl_estimator)
        total = pg + dataclasses.replace(kl, values=kl.values * cfg.beta)
        info = {**info, "pg_loss": pg.loss.item(), "kl": kl.loss.item(),
                "entropy": _mean_counted(ent, roles)}
        return total, info

    def _update(self, terms, log: bool) -> dict:
        self.model.train()
        info = {}
        if log:  # gradient norm reaching each role, from the exact role split of the loss
            for name, role in (("sample", SAMPLE), ("decision", DECISION)):
                grads = torch.autograd.grad(terms.role_loss(role), list(self.model.parameters()),
                                            retain_graph=True, allow_unused=True)
                info[f"grad_norm_{name}"] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads
                                                          if g is not None))
        loss = terms.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower --lr or "
                                     "--grad-clip and resume from the last checkpoint")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        self.model.eval()
        return {"loss": loss.item(), "loss_sample": terms.role_loss(SAMPLE).item(),
                "loss_decision": terms.role_loss(DECISION).item(), **info}

    def train_step(self) -> dict:
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
        if resume:
            self.resume()
        elif self.ckpt.exists():
            raise CheckpointError(f"{self.out} already holds a checkpoint; pass --resume to continue "
                                  "it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.stage == "sft":
            self.sft_data = self._load_or_build_sft_data()
        (self.out / "run.json").write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "init": str(self.init), "ref": str(self.ref_path),
             "versions": run_versions()}, indent=2))
        start_time = time.time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, disable=self.quiet)
        with _StopRequested() as stop, open(self.out / "log.jsonl", "a") as log:
            while self.step < cfg.steps:
                info = self.train_step()
                self.step += 1
                bar.update(1)
                row = {"step": self.step, **info} if self.step % cfg.log_every == 0 else None
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    m = self.evaluate().query("cell == 'all'").set_index("metric")["value"]
                    row = {"step": self.step, **info, **{f"eval_{k}": float(v) for k, v in m.items()}}
                if row is not None:
                    row["elapsed_s"] = time.time() - start_time
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix({k: round(v, 3) for k, v in row.items()
                                     if k in ("loss", "reward", "eval_realized_accuracy")})
                interrupted = stop.flag or (stop_after is not None and self.step >= stop_after)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or interrupted:
                    self.save()
                if interrupted and self.step < cfg.steps:
                    bar.close()
                    raise Interrupted(f"stopped at step {self.step}; checkpoint saved in {self.ckpt}, "
                                      "continue with --resume")
        bar.close()
        self.evaluate().to_csv(self.out / "metrics.csv", index=False)
        return self.ckpt

    def _load_or_build_sft_data(self) -> torch.Tensor:
        path = self.out / "sft_data.safetensors"
        if path.is_file():
            return load_file(str(path))["tokens"]
        data = reflective_sft_data(self.model, self.task, self.cfg.sft_questions, seed=self.cfg.seed,
                                   first_right_fraction=self.cfg.first_right_fraction)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": data}, str(tmp))
        tmp.rename(path)
        return data


def _mean_counted(x: torch.Tensor, roles: torch.Tensor) -> float:
    mask = (roles == SAMPLE) | (roles == DECISION)
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def train_stage(cfg: TrainConfig, out, init=None, ref=None, resume=False, quiet=False,
                stop_after=None) -> Path:
    """Run one stage; returns its checkpoint folder."""
    return Trainer(cfg, out, init=init, ref=ref, quiet=quiet).run(resume=resume, stop_after=stop_after)


def pipeline(preset: str, out, quiet: bool = False, resume: bool = False, **overrides
             ) -> dict[str, Path]:
    """pretrain -> reflective SFT -> RL, in ``out/base``, ``out/sft``, ``out/rl``."""
    out = Path(out)
    paths = {}
    for stage, name, init, ref in (("pretrain", "base", None, None), ("sft", "sft", "base", None),
                                   ("rl", "rl", "sft", "sft")):
        cfg = preset_config(preset, stage, **overrides)
        folder = out / name
        done = (folder / "metrics.csv").is_file()
        if not done:
            t0 = time.time()
            train_stage(cfg, folder, init=paths.get(init), ref=paths.get(ref),
                        resume=resume and (folder / "checkpoint").exists(), quiet=quiet)
            (folder / "wall_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        paths[name] = folder / "checkpoint"
    return paths


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsds_interp.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=(*STAGES, "pipeline"))
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--out", required=True, help="stage folder (pipeline: parent of base/sft/rl)")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "stage" and getattr(args, f.name) is not None}
    try:
        if args.stage == "pipeline":
            paths = pipeline(args.preset, args.out, quiet=args.quiet, resume=args.resume, **overrides)
            print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        else:
            cfg = preset_config(args.preset, args.stage, **overrides)
            ckpt = train_stage(cfg, args.out, init=args.init, ref=args.ref, resume=args.resume,
                               quiet=args.quiet)
            print(f"checkpoint: {ckpt}")
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except (ValueError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
