"""Linear probes for candidate correctness: where the verification information is, and where the decision reads it.

``python -m tsds_interp.probe --checkpoint sft [--cells all] [--out runs/probe]``

Rows are teacher-forced ``prompt + candidate`` sequences: for each question where the model wrote a
wrong sample, the true product (label 1) and up to ``max_wrong`` of its own wrong samples (label 0),
so both classes come from the same questions and a probe cannot score by difficulty. Sites: the
residual stream before each layer and after the last (``resid L``), and each head's output written
into the stream (``LlHh``: ``z_h @ W_O[h]``). Positions: ``prompt_end`` (the last prompt token; it
cannot see the candidate, a control that must score 0.5), ``candidate_mean`` (mean over the
candidate's tokens) and ``decision`` (the last candidate token, whose logits are the decision).

A logistic-regression probe per site and position is fitted on training-split questions and
scored on held-out ones with the within-question AUC (truth vs the same question's wrong samples;
95% bootstrap interval over questions). ``readout_auc`` scores the same rows by the direction the
decision reads (``W_U[:, ACCEPT] - W_U[:, REJECT]`` through the final norm's weights, centred) with
no fitting, and ``cos_readout`` is the cosine between that direction and the probe's. High probe AUC
with low readout AUC: the information is there, in a form the decision does not read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tsds_interp import checks, stats
from tsds_interp.model import config_of
from tsds_interp.pairs import own_samples
from tsds_interp.rollout import progress, sample_steps
from tsds_interp.task import (
    ACCEPT,
    REJECT,
    TaskConfig,
    answer_tokens,
    prompt_tokens,
    question_states,
    sample_questions,
    state_tokens,
    true_step_tokens,
)
from tsds_interp.verification import MAX_QUESTIONS, check_sampling

POSITIONS = ("prompt_end", "candidate_mean", "decision")


@dataclass
class ProbeRows:
    """Teacher-forced candidates: tokens, the question each belongs to, and whether it is the truth."""

    tokens: Int[Tensor, "row pos"]
    question: Int[Tensor, " row"]
    correct: Bool[Tensor, " row"]
    cells: np.ndarray  # cell label per row


def probe_rows(model, task: TaskConfig, split: str, n_questions: int, cells=None, samples: int = 8,
               temperature: float = 1.0, max_wrong: int = 3, seed: int = 0) -> ProbeRows:
    """The truth and up to ``max_wrong`` distinct own wrong samples of each question with a wrong sample
    (step format: of one state of each question's correct episode, the true step and own wrong steps)."""
    if task.steps:
        return _step_probe_rows(model, task, split, n_questions, cells, samples, temperature, max_wrong, seed)
    q = sample_questions(task, split, n_questions, seed=seed, cells=cells)
    sampled = own_samples(model, q, task, samples, temperature, seed + 1)
    truth = q.a * q.b
    prompt = prompt_tokens(q.a, q.b, task)
    toks, qid, label, cell = [], [], [], []
    for i in range(len(q)):
        wrong = torch.unique(sampled[i][(sampled[i] >= 0) & (sampled[i] != truth[i])])[:max_wrong]
        if len(wrong) == 0:
            continue
        values = torch.cat([truth[i : i + 1], wrong])
        toks.append(torch.cat([prompt[i].expand(len(values), -1), answer_tokens(values, task)], 1))
        qid += [i] * len(values)
        label += [True] + [False] * len(wrong)
        cell += [TaskConfig.cell_name(q.cells[i])] * len(values)
    if not toks:
        raise ValueError("the model wrote no wrong samples on these questions; ask for more questions or other cells")
    return ProbeRows(torch.cat(toks), torch.tensor(qid), torch.tensor(label), np.array(cell))


def _step_probe_rows(model, task: TaskConfig, split: str, n: int, cells, samples: int, temperature: float,
                     max_wrong: int, seed: int) -> ProbeRows:
    q = sample_questions(task, split, n, seed=seed, cells=cells)
    s = question_states(q, task, seed + 1)
    P, L = task.prompt_len, task.answer_len
    steps = sample_steps(model, s[torch.arange(n).repeat_interleave(samples)], task, temperature,
                         seed=seed + 1)[0][:, P : P + L].view(n, samples, L)
    truth, prompt = true_step_tokens(s, task), state_tokens(s, task)
    names = [TaskConfig.cell_name(c) for c in q.cells]
    toks, qid, label, cell = [], [], [], []
    for i in range(n):
        ok = (steps[i] <= 9).all(1) & ~(steps[i] == truth[i]).all(1)
        wrong = torch.unique(steps[i][ok], dim=0)[:max_wrong]
        if len(wrong) == 0:
            continue
        rows = torch.cat([truth[i : i + 1], wrong])
        toks.append(torch.cat([prompt[i].expand(len(rows), -1), rows], 1))
        qid += [i] * len(rows)
        label += [True] + [False] * len(wrong)
        cell += [names[i]] * len(rows)
    if not toks:
        raise ValueError("the model wrote no wrong steps on these states; ask for more questions or other cells")
    return ProbeRows(torch.cat(toks), torch.tensor(qid), torch.tensor(label), np.array(cell))


@torch.no_grad()
def site_activations(model, tokens: Int[Tensor, "row pos"], prompt_len: int, batch_size: int = 2048
                     ) -> dict[tuple[str, str], Float[Tensor, "row d_model"]]:
    """(site, position) -> activations: ``resid l`` (before layer l; l = n_layers: after the last) and
    each head's output ``LlHh`` in the residual basis, at each position class."""
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    names += [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    parts: dict[tuple[str, str], list[Tensor]] = {}
    for start in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[start : start + batch_size], names_filter=lambda n: n in names)
        sites = {f"resid {layer}": cache[names[layer]] for layer in range(L + 1)}
        for layer in range(L):
            out = torch.einsum("bphe,hed->hbpd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])
            sites.update({f"L{layer}H{h}": out[h] for h in range(model.cfg.n_heads)})
        for site, act in sites.items():
            for pos, x in (("prompt_end", act[:, prompt_len - 1]), ("candidate_mean", act[:, prompt_len:].mean(1)),
                           ("decision", act[:, -1])):
                parts.setdefault((site, pos), []).append(x.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def fit_probe(x: Float[Tensor, "row d"], y: Bool[Tensor, " row"], l2: float = 1e-2, steps: int = 100
              ) -> tuple[Float[Tensor, " d"], float]:
    """Class-balanced L2 logistic regression; returns the weight in the input basis and the bias."""
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    yf = y.float()
    weight = torch.where(y, 0.5 / yf.mean().clamp(min=1e-6), 0.5 / (1 - yf).mean().clamp(min=1e-6))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yf, reduction="none")
                ).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_in = (w / sd).detach()
    return w_in, float(b.detach() - (w_in * mu).sum())


def rows_within_auc(score: Float[Tensor, " row"], question: Int[Tensor, " row"], correct: Bool[Tensor, " row"]
                    ) -> np.ndarray:
    """:func:`tsds_interp.stats.within_auc` on rows: per question, its truth row against its wrong rows."""
    s, q, c = score.numpy(), question.numpy(), correct.numpy()
    groups = [(s[(q == qi) & c], s[(q == qi) & ~c]) for qi in np.unique(q)]
    groups = [(t[0], w) for t, w in groups if len(t) and len(w)]
    return stats.within_auc(np.array([t for t, _ in groups]), [w for _, w in groups])


def readout_direction(model) -> Float[Tensor, " d_model"]:
    """The residual-stream direction the ACCEPT - REJECT logit reads through the final norm."""
    u = (model.W_U[:, ACCEPT] - model.W_U[:, REJECT]).detach().float()
    w = model.state_dict().get("ln_final.weight")
    u = u * w.float() if w is not None else u
    return u - u.mean() if model.cfg.normalization_type in ("LN", "LNPre") else u


MIN_QUESTIONS = 16


def probe_study(model, cells=None, train_questions: int = 4096, test_questions: int = 2048, samples: int = 8,
                temperature: float = 1.0, seed: int = 0, n_boot: int = 1000, quiet: bool = True) -> pd.DataFrame:
    """One row per (site, position, test cell group): test within-question AUC of the probe with a 95%
    interval, its training AUC, the readout AUC and the probe's cosine with the readout direction."""
    task = config_of(model).task
    check_sampling(train_questions, samples, temperature, seed, n_boot, min_questions=MIN_QUESTIONS)
    checks.number("test_questions", test_questions, lo=MIN_QUESTIONS, hi=MAX_QUESTIONS, integer=True)
    chosen = None if cells in (None, "all") else task.in_distribution(cells)
    train = probe_rows(model, task, "train", train_questions, chosen, samples, temperature, seed=seed)
    test = probe_rows(model, task, "test", test_questions, chosen, samples, temperature, seed=seed + 100)
    a_train = site_activations(model, train.tokens, task.prompt_len)
    a_test = site_activations(model, test.tokens, task.prompt_len)
    u = readout_direction(model)
    rng = np.random.default_rng(seed)
    groups = [("all", np.ones(len(test.cells), bool))] + [(c, test.cells == c) for c in sorted(set(test.cells))]
    rows = []
    for (site, pos), x in progress(list(a_train.items()), "probes", "probe", quiet):
        w, b = fit_probe(x, train.correct)
        train_auc = rows_within_auc(x @ w, train.question, train.correct).mean()
        cos = float(torch.nn.functional.cosine_similarity(w, u, dim=0))
        xt = a_test[(site, pos)]
        for group, sel in groups:
            sel_t = torch.from_numpy(sel)
            auc = rows_within_auc((xt @ w)[sel_t], test.question[sel_t], test.correct[sel_t])
            read = rows_within_auc((xt @ u)[sel_t], test.question[sel_t], test.correct[sel_t])
            mean, lo, hi = stats.boot_mean(auc, rng, n_boot)
            rows.append(dict(site=site, position=pos, cell=group, probe_auc=mean, lo=lo, hi=hi, n=len(auc),
                             train_auc=train_auc, readout_auc=read.mean() if len(read) else np.nan,
                             cos_readout=cos))
    return pd.DataFrame(rows)


if __name__ == "__main__":  # python -m tsds_interp.probe
    from tsds_interp.cli.probe import main

    sys.exit(main())
