"""Pretraining, reflective SFT and RL: one loop, one step function per stage.

``python -m tsds_interp.train {pretrain,sft,rl,pipeline} --preset NAME --out DIR`` (see
:mod:`tsds_interp.cli.train`). :func:`train_stage` builds a :class:`Stage` (model, optimizer,
schedule, reference model), then repeats ``STEP[stage]`` until ``cfg.steps``, logging, evaluating
and checkpointing on the way (files and resume rules: :mod:`tsds_interp.checkpointing`; several
processes: :mod:`tsds_interp.distributed`). Every random draw is a function of ``(seed, step)``, so
a resumed run gives bit-identical weights on CPU.

- :func:`supervised_step` (pretrain, sft): a batch of token rows -> role-weighted cross-entropy -> update.
- :func:`rl_step`: questions -> rollouts -> outcome rewards -> group advantages -> ``ppo_epochs``
  clipped policy-gradient updates with a KL penalty to the reference model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from tsds_interp.checkpointing import (
    FolderLock,
    Interrupted,
    StopRequested,
    cached_tokens,
    check_resumable,
    check_stage_folder,
    restore_training_checkpoint,
    save_training_checkpoint,
    trim_log,
)
from tsds_interp.data import reflective_sft_data, solution_batch, verification_data
from tsds_interp.distributed import Dist
from tsds_interp.forward import fast_forward, refusal
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import autocast, build_model, config_of, grow, load
from tsds_interp.objectives import (
    Terms,
    advantages,
    discounted_reward,
    kl_terms,
    policy_gradient_terms,
    sft_terms,
    token_logprobs,
)
from tsds_interp.presets import STAGES, TrainConfig, preset_config
from tsds_interp.provenance import run_versions
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

__all__ = ["Interrupted", "Stage", "TrainConfig", "pipeline", "preset_config", "train_stage"]


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW, with the fused (one kernel for all parameters) implementation."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def lr_schedule(cfg: TrainConfig, total: int):
    """Linear warm-up over ``cfg.warmup`` updates, then cosine decay to 0.1 of the peak at ``total``."""
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The seed of one step's random draw (so a resumed run draws what the straight run drew)."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31)


@dataclass
class Stage:
    """Everything one training stage updates or reads: built once by :meth:`build`."""

    cfg: TrainConfig
    task: TaskConfig
    model: torch.nn.Module
    forward: torch.nn.Module       # own-weights forward where exact, else the hooked model
    net: torch.nn.Module           # ``forward``, wrapped in DDP under torchrun
    ref_forward: torch.nn.Module | None  # RL: the frozen reference of the KL penalty
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    dist: Dist
    step: int = 0
    sft_data: torch.Tensor | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, init=None, ref=None) -> Stage:
        d = Dist(cfg.device)
        cfg = dataclasses.replace(cfg, device=d.device)
        if cfg.stage == "pretrain":
            model = build_model(cfg.model_config(), device=cfg.device)
        elif init is None:
            raise ValueError(f"the {cfg.stage} stage starts from a model: pass --init CHECKPOINT")
        else:
            model = load(init, device=cfg.device)
            if cfg.stage == "sft" and cfg.add_layers:
                model = grow(model, cfg.add_layers, seed=cfg.seed)
        task = config_of(model).task
        ref_forward = None
        if cfg.stage == "rl":
            ref_model = load(ref or init, device=cfg.device).requires_grad_(False)
            if config_of(ref_model).task != task:
                raise ValueError(f"the KL reference {ref or init} was trained on another task "
                                 f"({config_of(ref_model).task}) than the model ({task}); pass a --ref "
                                 "of the same task")
            ref_forward = fast_forward(ref_model, "reference")
            d.shard(cfg.questions_per_step, "--questions-per-step")
        else:
            d.shard(cfg.batch_size, "--batch-size")
        forward = fast_forward(model, "training")
        opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        updates = cfg.steps * (cfg.ppo_epochs if cfg.stage == "rl" else 1)
        return cls(cfg, task, model, forward, DDP(forward) if d.world > 1 else forward, ref_forward, opt,
                   torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, updates)), d)


# ---------------------------------------------------------------- one update

def update(s: Stage, terms: Terms, log: bool) -> dict:
    """One optimizer step on ``terms.loss`` (with the gradient norm reaching each role when ``log``)."""
    s.model.train()
    info = {}
    if log:  # from the exact role split of the loss
        params = list(s.model.parameters())
        for name, role in (("sample", SAMPLE), ("decision", DECISION)):
            grads = torch.autograd.grad(terms.role_loss(role), params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
            info[f"grad_norm_{name}"] = float(s.dist.sum(flat).norm())
    global_loss = s.dist.sum(terms.loss.detach())
    if not torch.isfinite(global_loss):
        raise FloatingPointError(f"loss is {global_loss.item()} at step {s.step}; lower --lr or "
                                 "--grad-clip and resume from the last checkpoint")
    s.opt.zero_grad(set_to_none=True)
    (terms.loss * s.dist.world).backward()  # DDP averages gradients over ranks; the loss parts add up
    info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip))
    s.opt.step()
    s.sched.step()
    s.model.eval()
    return {"loss": global_loss.item(), "loss_sample": s.dist.sum(terms.role_loss(SAMPLE).detach()).item(),
            "loss_decision": s.dist.sum(terms.role_loss(DECISION).detach()).item(),
            "lr": s.sched.get_last_lr()[0], **info}


def counted_mean(x: torch.Tensor, roles: torch.Tensor, total=lambda t: t) -> float:
    """Mean of ``x`` over sample and decision tokens (of all ranks, with ``total = Dist.sum``)."""
    mask = (roles == SAMPLE) | (roles == DECISION)
    return float(total((x.detach() * mask).sum()) / total(mask.sum()).clamp(min=1))


# ---------------------------------------------------------------- pretrain and SFT

def supervised_batch(s: Stage) -> torch.Tensor:
    """This rank's rows of the step's batch: fresh correct solutions (pretrain) or the next slice of
    the SFT data, reshuffled every epoch."""
    cfg = s.cfg
    if cfg.stage == "pretrain":
        batch = solution_batch(s.task, cfg.batch_size, step_seed(cfg.seed, s.step))
    else:
        n = len(s.sft_data)
        epoch, i = divmod(s.step, max(1, n // cfg.batch_size))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(cfg.seed, epoch, 1)))
        batch = s.sft_data[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
    return batch[s.dist.shard(len(batch), "the batch")]


def supervised_step(s: Stage, log: bool) -> dict:
    """Pretraining and SFT: cross-entropy on sample and decision tokens, weighted by role."""
    tokens = supervised_batch(s)
    tokens = tokens[:, : int((tokens != PAD).sum(1).max())].to(s.cfg.device)  # drop all-PAD columns
    logp, entropy = token_logprobs(s.net, tokens)
    roles = token_roles(tokens, s.task).to(s.cfg.device)
    sft = s.cfg.stage == "sft"
    skip = rejected_candidate_tokens(tokens, s.task, roles) if sft and s.cfg.rejected_samples == "skip" else None
    terms = sft_terms(logp, roles, s.cfg.weighting if sft else "token_mean", s.cfg.decision_share,
                      total=s.dist.sum, skip=skip)
    return {**update(s, terms, log), "entropy": counted_mean(entropy, roles, s.dist.sum)}


def build_sft_data(s: Stage) -> torch.Tensor:
    """Reflective SFT rows from the initial model's own candidates (+ paired verification rows)."""
    cfg = s.cfg
    data = reflective_sft_data(s.model, s.task, cfg.sft_questions, seed=cfg.seed,
                               first_right_fraction=cfg.first_right_fraction, mix=cfg.sft_mix,
                               temperature=cfg.sft_temperature)
    if cfg.verify_questions:
        pairs = verification_data(s.model, s.task, cfg.verify_questions, seed=cfg.seed,
                                  temperature=cfg.sft_temperature)
        data = torch.cat([data, pairs])[torch.randperm(len(data) + len(pairs),
                                                       generator=torch.Generator().manual_seed(cfg.seed))]
    return data


# ---------------------------------------------------------------- RL

@dataclass
class RLBatch:
    tokens: torch.Tensor
    roles: torch.Tensor       # rejected steps' tokens set to PADDING under rl_rejected_samples="mask"
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantage: torch.Tensor   # one per row (steps: each attempt carries its episode's advantage)
    info: dict


def rl_batch(s: Stage) -> RLBatch:
    """Rollouts of ``group`` episodes per question, their rewards and group-relative advantages."""
    cfg = s.cfg
    q = sample_questions(s.task, "train", cfg.questions_per_step, step_seed(cfg.seed, s.step))
    q = q.repeat_interleave(cfg.group)
    s.model.eval()
    r = rollout(s.model, q, task=s.task, temperature=cfg.temperature, seed=step_seed(cfg.seed, s.step, 2),
                rows=s.dist.shard(len(q), "the rollout batch"))
    tokens, roles = r.tokens.to(cfg.device), r.roles.to(cfg.device)
    with torch.no_grad():
        old_logp, _ = token_logprobs(s.forward, tokens)
        ref_logp, _ = token_logprobs(s.ref_forward, tokens)
    retries = r.n_attempts - (r.n_calls - 1 if s.task.steps else 0)  # 1 when nothing was rejected
    adv = advantages(discounted_reward(r.reward, retries, cfg.discount).to(cfg.device), cfg.group, cfg.advantage)
    if s.task.steps:
        adv = adv[r.episode.to(cfg.device)]
        if cfg.rl_rejected_samples == "mask":
            roles = roles.masked_fill(rejected_candidate_tokens(tokens, s.task, roles), PADDING)
    n = len(q)
    return RLBatch(tokens, roles, old_logp, ref_logp, adv, {
        "reward": s.dist.sum(r.reward.sum()).item() / n, "attempts": s.dist.sum(r.n_attempts.float().sum()).item() / n})


def rl_loss(s: Stage, b: RLBatch) -> tuple[Terms, dict]:
    """Clipped policy-gradient terms plus ``beta`` times the KL terms to the reference."""
    logp, entropy = token_logprobs(s.net, b.tokens)
    pg = policy_gradient_terms(logp, b.old_logp, b.roles, b.advantage, clip=s.cfg.clip_eps, total=s.dist.sum)
    kl = kl_terms(logp, b.ref_logp, b.roles, beta=1.0, estimator=s.cfg.kl_estimator, total=s.dist.sum)
    terms = pg + dataclasses.replace(kl, values=kl.values * s.cfg.beta)
    return terms, {"pg_loss": s.dist.sum(pg.loss).item(), "kl": s.dist.sum(kl.loss).item(),
                   "entropy": counted_mean(entropy, b.roles, s.dist.sum)}


def rl_step(s: Stage, log: bool) -> dict:
    """RL: roll out, score, then ``ppo_epochs`` updates on the same episodes."""
    batch = rl_batch(s)
    for epoch in range(s.cfg.ppo_epochs):
        terms, info = rl_loss(s, batch)
        result = update(s, terms, log and epoch == 0)
    return {**result, **batch.info, **info}


STEP = {"pretrain": supervised_step, "sft": supervised_step, "rl": rl_step}


# ---------------------------------------------------------------- the loop

EVAL_CHUNK = 1024  # evaluation rows decoded between two looks at the stop flag (a fraction of a second)


def evaluate(s: Stage, questions, stop: StopRequested | None = None) -> pd.DataFrame | None:
    """Held-out DS metrics of the model now, from row chunks of one rollout (the very episodes of one
    call); None as soon as ``stop`` is raised, so that Ctrl-C is honoured within a chunk, not after
    the whole evaluation."""
    parts = []
    for lo in range(0, len(questions), EVAL_CHUNK):
        if stop is not None and stop.flag:
            return None
        parts.append(rollout(s.model, questions, task=s.task, temperature=s.cfg.eval_temperature, seed=99,
                             rows=slice(lo, lo + EVAL_CHUNK)))
    return ds_metrics(type(parts[0]).cat(parts))


def save_checkpoint(s: Stage, out: Path) -> None:
    if s.dist.is_first:
        save_training_checkpoint(Path(out) / "checkpoint", s.model, s.opt, s.sched, s.step, s.cfg)


def run_stage(s: Stage, out, resume: bool = False, quiet: bool = False, stop_after: int | None = None,
              init=None, ref=None) -> Path:
    """Train ``s`` to ``cfg.steps`` in ``out`` (or stop after ``stop_after`` steps, as an interrupt would)."""
    out = Path(out)
    check_stage_folder(out, resume)
    if resume:  # read-only checks first: a refused resume leaves the folder untouched
        check_resumable(out / "checkpoint", s.cfg)
        s.step = restore_training_checkpoint(out / "checkpoint", s.model, s.opt, s.sched)
    with FolderLock(out, enabled=s.dist.is_first):
        return _train_loop(s, out, resume, quiet, stop_after, init, ref)


def _train_loop(s: Stage, out: Path, resume: bool, quiet: bool, stop_after: int | None, init, ref) -> Path:
    cfg, first = s.cfg, s.dist.is_first
    if resume and first:
        trim_log(out / "log.jsonl", s.step)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage == "sft":
        s.sft_data = cached_tokens(out / "sft_data.safetensors", lambda: build_sft_data(s), write=first)
    if first:
        (out / "run.json").write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "init": str(init), "ref": str(ref),
             "forward": "own weights" if s.forward is not s.model else f"hooked ({refusal(s.model)})",
             "world_size": s.dist.world, "versions": run_versions()}, indent=2))
    eval_q = sample_questions(s.task, "test", cfg.eval_questions, seed=10_007)
    step_fn, start = STEP[cfg.stage], time.time()
    bar = tqdm(total=cfg.steps, initial=s.step, desc=cfg.stage, disable=quiet or not first)
    log = open(out / "log.jsonl", "a") if first else None
    try:
        with StopRequested() as stop:
            while s.step < cfg.steps:
                with autocast(cfg.device, cfg.autocast):
                    info = step_fn(s, log=(s.step + 1) % cfg.log_every == 0)
                s.step += 1
                bar.update(1)
                row = {"step": s.step, **info}
                evaluated = first and (s.step % cfg.eval_every == 0 or s.step == cfg.steps)
                if evaluated and (metrics := evaluate(s, eval_q, stop)) is not None:
                    m = metrics.query("cell == 'all'").set_index("metric")["value"]
                    row.update({f"eval_{k}": float(v) for k, v in m.items()})
                if first and (evaluated or s.step % cfg.log_every == 0):
                    log.write(json.dumps({**row, "elapsed_s": time.time() - start}) + "\n")
                    log.flush()
                    bar.set_postfix({k: round(v, 3) for k, v in row.items()
                                     if k in ("loss", "reward", "eval_realized_accuracy")})
                interrupted = s.dist.any(stop.flag or (stop_after is not None and s.step >= stop_after))
                if s.step % cfg.ckpt_every == 0 or s.step == cfg.steps or interrupted:
                    save_checkpoint(s, out)
                if interrupted and s.step < cfg.steps:
                    raise Interrupted(f"stopped at step {s.step}; checkpoint saved in {out / 'checkpoint'}, "
                                      "continue with --resume")
    finally:
        bar.close()
        if log is not None:
            log.close()
    if first:
        evaluate(s, eval_q).to_csv(out / "metrics.csv", index=False)
    s.dist.barrier()  # the next stage reads what rank 0 wrote
    return out / "checkpoint"


def train_stage(cfg: TrainConfig, out, init=None, ref=None, resume=False, quiet=False,
                stop_after=None) -> Path:
    """Run one stage; returns its checkpoint folder."""
    return run_stage(Stage.build(cfg, init, ref), out, resume, quiet, stop_after, init=init, ref=ref)


def pipeline(preset: str, out, quiet: bool = False, resume: bool = False, **overrides) -> dict[str, Path]:
    """pretrain -> reflective SFT -> RL, in ``out/base``, ``out/sft``, ``out/rl``."""
    out = Path(out)
    paths = {}
    configs = {stage: preset_config(preset, stage, **overrides) for stage in STAGES}  # all checked first
    for stage, name, init, ref in (("pretrain", "base", None, None), ("sft", "sft", "base", None),
                                   ("rl", "rl", "sft", "sft")):
        folder = out / name
        if not (folder / "metrics.csv").is_file():
            t0 = time.time()
            train_stage(configs[stage], folder, init=paths.get(init), ref=paths.get(ref),
                        resume=resume and (folder / "checkpoint").exists(), quiet=quiet)
            if int(os.environ.get("RANK", "0")) == 0:
                (folder / "wall_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        paths[name] = folder / "checkpoint"
    return paths


if __name__ == "__main__":  # python -m tsds_interp.train
    import sys

    from tsds_interp.cli.train import main

    sys.exit(main())
