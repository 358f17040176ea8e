"""Training data: correct solutions for pretraining, reflective SFT data from the model's own samples,
and paired verification rows (the same question with a right and a wrong candidate)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tsds_interp.rollout import rollout, sample_steps
from tsds_interp.task import (
    ACCEPT,
    EOS,
    REJECT,
    States,
    TaskConfig,
    build_trajectories,
    check_steps,
    corrupt_digit,
    corrupt_step_tokens,
    random_states,
    sample_questions,
    state_tokens,
    true_step_tokens,
)

Mix = Literal["fixed", "natural"]


def solution_batch(task: TaskConfig, n: int, seed: int) -> Int[Tensor, "n pos"]:
    """``n`` random training questions answered right at the first attempt and accepted (step
    format: a random state of each question's correct episode, its correct step, ACCEPT)."""
    if task.steps:
        s = random_states(task, "train", n, seed)
        return attempt_rows(s, true_step_tokens(s, task), torch.full((n,), ACCEPT), task)
    q = sample_questions(task, "train", n, seed)
    accept = torch.full((n,), ACCEPT)
    return build_trajectories(q.a, q.b, [q.a * q.b], [accept], task)


def _own_candidates(model, q, task: TaskConfig, k: int, temperature: float, seed: int,
                    batch_size: int) -> list[Int[Tensor, " n"]]:
    """``k`` independent first-attempt candidates per question (-1 where malformed)."""
    return [rollout(model, q, task=task, budget=1, temperature=temperature, seed=seed * 1009 + i,
                    batch_size=batch_size).values[:, 0] for i in range(k)]


@torch.no_grad()
def reflective_sft_data(model, task: TaskConfig, n: int, seed: int, first_right_fraction: float = 0.5,
                        temperature: float = 1.0, batch_size: int = 2048, mix: Mix = "fixed"
                        ) -> Int[Tensor, "m pos"]:
    """Reflective trajectories labelled by the exact checker from the model's own candidates.

    For each question, ``budget`` candidates are sampled independently at ``temperature`` (first
    attempts of separate rollouts). The trajectory keeps them up to the first right one; wrong ones
    are followed by REJECT, the right one by ACCEPT. If none of the first ``budget - 1`` is right,
    the last attempt is the true product (a corrected trajectory). With ``mix="natural"`` every
    usable trajectory is kept, so the share right at the first attempt is the model's own accuracy
    in each cell; with ``mix="fixed"`` trajectories right at the first attempt are subsampled to
    ``first_right_fraction`` of the data where the counts allow (fewer than ``n`` rows come back if
    there are too few of a kind).
    """
    if not 0 <= first_right_fraction <= 1:
        raise ValueError(f"first_right_fraction must be in [0, 1], got {first_right_fraction}")
    if mix not in ("fixed", "natural"):
        raise ValueError(f"mix must be 'fixed' or 'natural', got {mix!r}")
    if task.steps:
        return _reflective_step_data(model, task, n, seed, first_right_fraction, temperature, batch_size, mix)
    q = sample_questions(task, "train", n, seed)
    K = task.budget
    cands = _own_candidates(model, q, task, K, temperature, seed, batch_size)
    truth = q.a * q.b
    cands[-1] = truth
    right = torch.stack([c == truth for c in cands], 1)
    first_right_at = right.float().argmax(1)
    decisions = [torch.where(right[:, i], ACCEPT, REJECT) for i in range(K)]
    # A candidate with a non-digit token cannot be written as digits: drop rows that keep one.
    valid = torch.stack([c >= 0 for c in cands], 1)
    usable = torch.stack([valid[i, : first_right_at[i] + 1].all() for i in range(n)])
    traj = build_trajectories(q.a, q.b, [c.clamp(min=0) for c in cands], decisions, task)
    first = usable & (first_right_at == 0)
    corrected = usable & (first_right_at > 0)
    n_first, n_corr = int(first.sum()), int(corrected.sum())
    if n_first + n_corr == 0:
        raise ValueError("no usable reflective trajectories (the model wrote no well-formed candidate); "
                         "sample more questions or train the model longer")
    gen = torch.Generator().manual_seed(seed)
    if mix == "natural":
        idx = usable.nonzero().squeeze(1)
        return traj[idx[torch.randperm(len(idx), generator=gen)]]
    # Largest total with the asked-for mix that both pools can fill.
    total = n_first + n_corr
    if 0 < first_right_fraction < 1:
        total = min(total, int(n_first / first_right_fraction), int(n_corr / (1 - first_right_fraction)))
    if total == 0:
        raise ValueError(f"no reflective trajectories with first_right_fraction={first_right_fraction}: "
                         f"{n_first} right at the first attempt, {n_corr} corrected; sample more questions "
                         "or change the fraction")
    k_first = round(total * first_right_fraction)
    k_corr = total - k_first
    idx_first = first.nonzero().squeeze(1)[torch.randperm(n_first, generator=gen)[:k_first]]
    idx_corr = corrected.nonzero().squeeze(1)[torch.randperm(n_corr, generator=gen)[:k_corr]]
    idx = torch.cat([idx_first, idx_corr])
    return traj[idx[torch.randperm(len(idx), generator=gen)]]


@torch.no_grad()
def verification_data(model, task: TaskConfig, n: int, seed: int, samples: int = 4,
                      temperature: float = 1.0, batch_size: int = 2048) -> Int[Tensor, "m pos"]:
    """Paired verification rows: for each of ``n`` training questions, ``prompt truth ACCEPT`` and
    ``prompt wrong REJECT``, so the question alone says nothing about the label.

    The wrong candidate is the first of ``samples`` of the model's own first attempts (at
    ``temperature``) that is well-formed and wrong; where the model wrote none, the true product
    with one digit changed stands in. Rows are in question order, the right one first.
    """
    if n < 1:
        raise ValueError(f"verification_data needs n >= 1 questions, got {n}")
    if task.steps:
        return _step_verification_data(model, task, n, seed, samples, temperature, batch_size)
    q = sample_questions(task, "train", n, seed + 7)
    truth = q.a * q.b
    wrong = torch.full_like(truth, -1)
    for c in _own_candidates(model, q, task, samples, temperature, seed + 7, batch_size):
        take = (wrong < 0) & (c >= 0) & (c != truth)
        wrong[take] = c[take]
    missing = wrong < 0
    wrong[missing] = corrupt_digit(truth[missing], task, np.random.default_rng(seed))
    a, b = q.a.repeat_interleave(2), q.b.repeat_interleave(2)
    cand = torch.stack([truth, wrong], 1).flatten()
    dec = torch.tensor([ACCEPT, REJECT]).repeat(n)
    return build_trajectories(a, b, [cand], [dec], task)


# ---------------------------------------------------------------- step format

def attempt_rows(s: States, steps: Int[Tensor, "n step"], decisions: Int[Tensor, " n"], task: TaskConfig
                 ) -> Int[Tensor, "n pos"]:
    """Step-format rows ``BOS state step decision EOS``."""
    return torch.cat([state_tokens(s, task), steps, decisions[:, None], torch.full((len(s), 1), EOS)], 1)


def _own_steps(model, s: States, task: TaskConfig, k: int, temperature: float, seed: int, batch_size: int
               ) -> list[Int[Tensor, "n step"]]:
    """``k`` independent steps per state at ``temperature`` (rows with a non-digit token hold it)."""
    P, L = task.prompt_len, task.answer_len
    return [sample_steps(model, s, task, temperature, seed=seed * 1009 + i, batch_size=batch_size)[0][:, P:P + L]
            for i in range(k)]


def _reflective_step_data(model, task: TaskConfig, n: int, seed: int, first_right_fraction: float,
                          temperature: float, batch_size: int, mix: Mix) -> Int[Tensor, "m pos"]:
    """Step format: per state, its own steps up to the first right one (the ``budget``-th attempt is
    the correct step if none of the earlier ones is), wrong ones REJECTed, the right one ACCEPTed;
    each attempt is its own row, since a call's attempts do not see each other. States with a
    malformed step before the right one are dropped."""
    s = random_states(task, "train", n, seed)
    K = task.budget
    truth = true_step_tokens(s, task)
    steps = _own_steps(model, s, task, K - 1, temperature, seed, batch_size) + [truth]
    right = torch.stack([(st == truth).all(1) for st in steps], 1)
    valid = torch.stack([(st <= 9).all(1) for st in steps], 1)
    first_right_at = right.float().argmax(1)
    usable = torch.stack([valid[i, : first_right_at[i] + 1].all() for i in range(n)])
    if not usable.any():
        raise ValueError("no usable reflective steps (the model wrote no well-formed step); sample more "
                         "questions or train the model longer")
    gen = torch.Generator().manual_seed(seed)
    keep = usable.nonzero().squeeze(1)
    if mix == "fixed":
        first = keep[first_right_at[keep] == 0]
        later = keep[first_right_at[keep] > 0]
        total = len(keep)
        if 0 < first_right_fraction < 1:
            total = min(total, int(len(first) / first_right_fraction), int(len(later) / (1 - first_right_fraction)))
        k_first = round(total * first_right_fraction)
        if total == 0:
            raise ValueError(f"no reflective steps with first_right_fraction={first_right_fraction}: "
                             f"{len(first)} right at the first attempt, {len(later)} corrected; sample more "
                             "questions or change the fraction")
        keep = torch.cat([first[torch.randperm(len(first), generator=gen)[:k_first]],
                          later[torch.randperm(len(later), generator=gen)[: total - k_first]]])
    rows = []
    for k in range(K):
        sel = keep[first_right_at[keep] >= k]
        dec = torch.where(right[sel, k], ACCEPT, REJECT)
        rows.append(attempt_rows(s[sel], steps[k][sel], dec, task))
    rows = torch.cat(rows)
    return rows[torch.randperm(len(rows), generator=gen)]


def _step_verification_data(model, task: TaskConfig, n: int, seed: int, samples: int, temperature: float,
                            batch_size: int) -> Int[Tensor, "m pos"]:
    """Step format: per state, ``state truth ACCEPT`` and ``state wrong REJECT``, the wrong step the
    first of the model's own ``samples`` that is well-formed and wrong, else a one-digit corruption."""
    s = random_states(task, "train", n, seed + 7)
    truth = true_step_tokens(s, task)
    wrong = corrupt_step_tokens(truth, task, np.random.default_rng(seed))
    found = torch.zeros(n, dtype=torch.bool)
    for st in _own_steps(model, s, task, samples, temperature, seed + 7, batch_size):
        take = ~found & (st <= 9).all(1) & ~check_steps(s, st.clamp(max=9), task)
        wrong[take] = st[take]
        found |= take
    idx = torch.arange(n).repeat_interleave(2)
    steps = torch.stack([truth, wrong], 1).flatten(0, 1)
    dec = torch.tensor([ACCEPT, REJECT]).repeat(n)
    return attempt_rows(s[idx], steps, dec, task)
