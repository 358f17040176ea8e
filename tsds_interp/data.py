"""Training data: correct solutions for pretraining, reflective SFT data from the model's own samples."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from tsds_interp.rollout import rollout
from tsds_interp.task import ACCEPT, REJECT, TaskConfig, build_trajectories, sample_questions


def solution_batch(task: TaskConfig, n: int, seed: int) -> Int[Tensor, "n pos"]:
    """``n`` random training questions answered right at the first attempt and accepted."""
    q = sample_questions(task, "train", n, seed)
    accept = torch.full((n,), ACCEPT)
    return build_trajectories(q.a, q.b, [q.a * q.b], [accept], task)


@torch.no_grad()
def reflective_sft_data(model, task: TaskConfig, n: int, seed: int, first_right_fraction: float = 0.5,
                        temperature: float = 1.0, batch_size: int = 2048) -> Int[Tensor, "m pos"]:
    """Reflective trajectories labelled by the exact checker from the model's own candidates.

    For each question, ``budget`` candidates are sampled independently (first attempts of separate
    rollouts). The trajectory keeps them up to the first right one; wrong ones are followed by
    REJECT, the right one by ACCEPT. If none of the first ``budget - 1`` is right, the last attempt
    is the true product (a corrected trajectory). Trajectories right at the first attempt are then
    subsampled so that they make up ``first_right_fraction`` of the data where the counts allow
    (the rest are corrected ones); fewer than ``n`` rows come back if there are too few of a kind.
    """
    if not 0 <= first_right_fraction <= 1:
        raise ValueError(f"first_right_fraction must be in [0, 1], got {first_right_fraction}")
    q = sample_questions(task, "train", n, seed)
    K = task.budget
    cands = [rollout(model, q, task=task, budget=1, temperature=temperature, seed=seed * 1009 + i,
                     batch_size=batch_size).values[:, 0] for i in range(K)]
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
    gen = torch.Generator().manual_seed(seed)
    idx_first = first.nonzero().squeeze(1)[torch.randperm(n_first, generator=gen)[:k_first]]
    idx_corr = corrected.nonzero().squeeze(1)[torch.randperm(n_corr, generator=gen)[:k_corr]]
    idx = torch.cat([idx_first, idx_corr])
    return traj[idx[torch.randperm(len(idx), generator=gen)]]
