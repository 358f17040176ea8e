"""Contrast pairs: the clean and corrupted inputs whose metric difference isolates one function.

Decision pairs hold the question (one-shot) or the state (steps) fixed and differ in the candidate:
the true product or step against the model's own wrong sample (or a one-digit corruption where the
model has too few), read by the ACCEPT - REJECT logit at the decision position. Sampling pairs are
two questions or states one operand digit apart, read by the log-probability of the clean answer.
Decision pairs come from the cells where the decision tells its own wrong samples from the truth
(:func:`screen_cells`), on held-out questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tsds_interp.model import config_of, task_of
from tsds_interp.rollout import rollout_with_progress, sample_steps
from tsds_interp.stats import boot_mean, mean_gap
from tsds_interp.task import (
    ACCEPT,
    REJECT,
    Cell,
    Questions,
    States,
    TaskConfig,
    answer_tokens,
    corrupt_digit,
    corrupt_step_tokens,
    num_digits,
    prompt_tokens,
    random_states,
    sample_questions,
    state_tokens,
    true_step_tokens,
)
from tsds_interp.verification import decision_scores, score_candidates


@dataclass
class Pairs:
    """Clean/corrupted token pairs of equal length and the metric that reads them."""

    function: Literal["decision", "sampling"]
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answer: Int[Tensor, "batch answer"]   # sampling: the clean answer tokens; decision: unused
    origin: list[str]                     # decision: "model" or "corruption" per pair
    prompt_len: int
    cells: list[str] = field(default_factory=list)  # the difficulty cells the questions come from
    cell_rule: str = "all"                # how those cells were chosen

    def metric_per_pair(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        if self.function == "decision":
            last = logits[:, -1]
            return last[:, ACCEPT] - last[:, REJECT]
        L, P = self.answer.shape[1], self.prompt_len
        logp = logits[:, P - 1 : P - 1 + L].log_softmax(-1)
        return logp.gather(-1, self.answer[:, :, None]).squeeze(-1).sum(1)

    def metric(self, logits) -> Tensor:
        return self.metric_per_pair(logits).mean()

    @torch.no_grad()
    def gap(self, model, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """Mean clean - corrupted metric over pairs with a 95% bootstrap interval over pairs."""
        d = (self.metric_per_pair(model(self.clean)) - self.metric_per_pair(model(self.corrupted))).float()
        return boot_mean(d.cpu().numpy(), np.random.default_rng(seed), n_boot)

    def __len__(self) -> int:
        return self.clean.shape[0]


def own_samples(model, questions: Questions, task: TaskConfig, samples: int, temperature: float, seed: int
                ) -> Int[Tensor, "n samples"]:
    """``samples`` first-attempt candidates per question (-1 = malformed), sampled at ``temperature``."""
    r = rollout_with_progress(model, questions.repeat_interleave(samples), "sampling candidates", task=task,
                              budget=1, temperature=temperature, seed=seed)
    return r.values[:, 0].view(len(questions), samples)


def screen_cells(model, task: TaskConfig, questions_per_cell: int = 128, samples: int = 8,
                 temperature: float = 1.0, seed: int = 0, n_boot: int = 1000, min_wrong: int = 20,
                 max_rounds: int = 4) -> pd.DataFrame:
    """Where does the decision tell the truth from the model's own wrong samples? Per in-distribution
    cell, on training-split questions (never the held-out ones pairs are drawn from), drawn in rounds
    of ``questions_per_cell`` until ``min_wrong`` have a wrong sample: the mean within-question
    ACCEPT-REJECT logit gap, truth minus own wrong samples, with a bootstrap interval over questions
    at the Bonferroni level 1 - 0.05 / cells; ``deciding`` where it lies above 0 (and >= 5 questions)."""
    rng = np.random.default_rng(seed)
    rows = []
    for cell in task.train_cells:
        gaps = []
        for rnd in range(max_rounds):
            q = sample_questions(task, "train", questions_per_cell, seed=seed + 3 + 100 * rnd, cells=(cell,))
            gaps.append(_within_gaps(model, q, own_samples(model, q, task, samples, temperature, seed + 4 + rnd),
                                     task))
            if sum(map(len, gaps)) >= min_wrong:
                break
        gaps = np.concatenate(gaps)
        _, lo, hi = boot_mean(gaps, rng, n_boot, level=1 - 0.05 / len(task.train_cells))
        rows.append(dict(cell=TaskConfig.cell_name(cell), gap=gaps.mean() if len(gaps) else np.nan, lo=lo, hi=hi,
                         questions_with_wrong=len(gaps), deciding=bool(len(gaps) >= 5 and lo > 0)))
    return pd.DataFrame(rows)


def _within_gaps(model, q: Questions, sampled: Int[Tensor, "n samples"], task: TaskConfig) -> np.ndarray:
    """Per question with a wrong sample: decision logit gap of the truth minus the mean over its wrong samples."""
    v = score_candidates(q, sampled[:, 0], sampled, task, lambda t: decision_scores(model, t), attempts=1)
    return mean_gap(v.attempts[0]["truth"], v.attempts[0]["wrong"])


def _check_fallback(fallback: bool, k_model: int, what: str, cells) -> None:
    """Without the corruption fallback, too few of the model's own wrong candidates is an error."""
    if not fallback:
        raise ValueError(f"the model made only {k_model} wrong {what} in cells {TaskConfig.cell_names(cells)}; "
                         "ask for fewer pairs, other cells, a higher temperature, or allow the corruption fallback")


def decision_pairs(model, task: TaskConfig, n: int, seed: int = 0, cells: str | tuple[str, ...] = "auto",
                   samples: int = 8, temperature: float = 1.0, fallback: bool = True, max_rounds: int = 8
                   ) -> Pairs:
    """Same question, the true product (clean) vs the model's own wrong sample (corrupted); the metric
    is the ACCEPT - REJECT logit at the decision position.

    ``cells``: ``"auto"`` (default) takes the cells where the decision separates the truth from the
    model's own wrong samples on screening questions (:func:`screen_cells`; every cell with wrong
    samples if none does), ``"all"`` every in-distribution cell, or a list such as ``"1x2,2x1"``.
    Held-out questions of those cells are drawn in rounds, ``samples`` candidates each at
    ``temperature``, one pair per question with a wrong sample, until ``n`` pairs or ``max_rounds``.
    With ``fallback``, any shortfall is filled with one-digit corruptions of the truth (``origin``
    says which pairs are which); without it, a shortfall is an error.
    """
    if n < 1:
        raise ValueError(f"asked for {n} pairs; ask for at least 1")
    task = task_of(model, task)
    if task.steps:
        return _step_decision_pairs(model, task, n, seed, cells, samples, temperature, fallback, max_rounds)
    rule, chosen = _choose_cells(model, task, cells, samples, temperature, seed)
    rng = np.random.default_rng(seed)
    qa, qb, wrong = [], [], []
    for rnd in range(max_rounds):
        q = sample_questions(task, "test", max(4 * n, 64), seed=seed + 1 + 1000 * rnd, cells=chosen)
        sampled = own_samples(model, q, task, samples, temperature, seed + 1000 * rnd)
        is_wrong = (sampled >= 0) & (sampled != (q.a * q.b)[:, None])
        has = is_wrong.any(1).nonzero().squeeze(1)
        first = is_wrong[has].float().argmax(1)
        qa.append(q.a[has]), qb.append(q.b[has]), wrong.append(sampled[has, first])
        if sum(len(x) for x in qa) >= n:
            break
    a, b, w = torch.cat(qa)[:n], torch.cat(qb)[:n], torch.cat(wrong)[:n]
    k_model = len(a)
    if k_model < n:
        _check_fallback(fallback, k_model, "samples", chosen)
        q = sample_questions(task, "test", n - k_model, seed=seed + 7, cells=chosen)
        a, b = torch.cat([a, q.a]), torch.cat([b, q.b])
        w = torch.cat([w, corrupt_digit(q.a * q.b, task, rng)])
    prompt = prompt_tokens(a, b, task)
    truth = answer_tokens(a * b, task)
    origin = ["model"] * k_model + ["corruption"] * (n - k_model)
    return Pairs("decision", torch.cat([prompt, truth], 1), torch.cat([prompt, answer_tokens(w, task)], 1),
                 truth, origin, task.prompt_len, cells=TaskConfig.cell_names(chosen), cell_rule=rule)


def _choose_cells(model, task: TaskConfig, cells, samples: int, temperature: float, seed: int
                  ) -> tuple[str, tuple[Cell, ...]]:
    if isinstance(cells, str) and cells == "all":
        return "all", task.train_cells
    if not (isinstance(cells, str) and cells == "auto"):
        return "given", task.in_distribution(cells)
    screen = screen_cells(model, task, samples=samples, temperature=temperature, seed=seed)
    deciding = screen[screen.deciding].cell.tolist()
    if deciding:
        return "auto: screened gap > 0", task.in_distribution(deciding)
    with_wrong = screen[screen.questions_with_wrong > 0].cell.tolist()
    return ("auto: no cell decides; cells with wrong samples",
            task.in_distribution(with_wrong or TaskConfig.cell_names(task.train_cells)))


def sampling_pairs(task: TaskConfig, n: int, seed: int = 0, cells: str | tuple[str, ...] = "all") -> Pairs:
    """Two questions differing in one digit of ``a``; the metric is the log-prob of the clean
    question's answer, teacher-forced after either prompt. ``cells``: ``"all"`` or a list."""
    if n < 1:
        raise ValueError(f"asked for {n} pairs; ask for at least 1")
    chosen = task.train_cells if cells in ("all", "auto") else task.in_distribution(cells)
    rng = np.random.default_rng(seed)
    if task.steps:
        return _step_sampling_pairs(task, n, seed, chosen, rng)
    q = sample_questions(task, "test", n, seed=seed + 2, cells=chosen)
    a2 = corrupt_digit(q.a, task, rng)
    bad = num_digits(a2) != num_digits(q.a)  # keep the difficulty cell: redo leading-digit zeros
    while bad.any():
        a2[bad] = corrupt_digit(q.a[bad], task, rng)
        bad = num_digits(a2) != num_digits(q.a)
    ans = answer_tokens(q.a * q.b, task)
    clean = torch.cat([prompt_tokens(q.a, q.b, task), ans], 1)
    corrupted = torch.cat([prompt_tokens(a2, q.b, task), ans], 1)
    return Pairs("sampling", clean, corrupted, ans, ["corruption"] * n, task.prompt_len,
                 cells=TaskConfig.cell_names(chosen),
                 cell_rule="all" if chosen == task.train_cells else "given")


def _step_decision_pairs(model, task: TaskConfig, n: int, seed: int, cells, samples: int, temperature: float,
                         fallback: bool, max_rounds: int) -> Pairs:
    """Step format: the same state (one drawn from a held-out question's correct episode), the true
    step (clean) vs the model's own wrong step (corrupted). ``"auto"`` means every in-distribution cell:
    in this format the decision is read per state, and every cell has states."""
    rule, chosen = ("all", task.train_cells) if cells in ("all", "auto") else ("given", task.in_distribution(cells))
    P, L = task.prompt_len, task.answer_len
    states, wrong = [], []
    for rnd in range(max_rounds):
        s = random_states(task, "test", max(4 * n, 64), seed=seed + 1 + 1000 * rnd, cells=chosen)
        idx = torch.arange(len(s)).repeat_interleave(samples)
        steps = sample_steps(model, s[idx], task, temperature, seed=seed + 1000 * rnd)[0][:, P : P + L]
        steps = steps.view(len(s), samples, L)
        ok = (steps <= 9).all(2)
        is_wrong = ok & ~(steps == true_step_tokens(s, task)[:, None]).all(2)
        has = is_wrong.any(1).nonzero().squeeze(1)
        states.append(s[has])
        wrong.append(steps[has, is_wrong[has].float().argmax(1)])
        if sum(len(x) for x in states) >= n:
            break
    s, w = States.cat(states)[:n], torch.cat(wrong)[:n]
    k_model = len(s)
    if k_model < n:
        _check_fallback(fallback, k_model, "steps", chosen)
        extra = random_states(task, "test", n - k_model, seed=seed + 7, cells=chosen)
        s = States.cat([s, extra])
        w = torch.cat([w, corrupt_step_tokens(true_step_tokens(extra, task), task, np.random.default_rng(seed))])
    prompt, truth = state_tokens(s, task), true_step_tokens(s, task)
    origin = ["model"] * k_model + ["corruption"] * (n - k_model)
    return Pairs("decision", torch.cat([prompt, truth], 1), torch.cat([prompt, w], 1), truth, origin, P,
                 cells=TaskConfig.cell_names(chosen), cell_rule=rule)


def _step_sampling_pairs(task: TaskConfig, n: int, seed: int, chosen: tuple[Cell, ...], rng) -> Pairs:
    """Step format: two states one digit of x apart (same y and r); the metric is the log-prob of
    the clean state's true step."""
    s = random_states(task, "test", n, seed=seed + 2, cells=chosen)
    x2 = corrupt_digit(s.x, task, rng)
    bad = num_digits(x2) != num_digits(s.x)
    while bad.any():
        x2[bad] = corrupt_digit(s.x[bad], task, rng)
        bad = num_digits(x2) != num_digits(s.x)
    step = true_step_tokens(s, task)
    clean = torch.cat([state_tokens(s, task), step], 1)
    corrupted = torch.cat([state_tokens(States(x2, s.y, s.r), task), step], 1)
    return Pairs("sampling", clean, corrupted, step, ["corruption"] * n, task.prompt_len,
                 cells=TaskConfig.cell_names(chosen),
                 cell_rule="all" if chosen == task.train_cells else "given")


def make_pairs(model, function: str, n_pairs: int = 32, seed: int = 0, cells: str = "auto") -> Pairs:
    """Decision pairs (truth vs the model's own wrong sample, ``cells`` as in
    :func:`~tsds_interp.patching.decision_pairs`) or sampling pairs (all cells unless given)."""
    task = config_of(model).task
    if function == "decision":
        return decision_pairs(model, task, n_pairs, seed=seed, cells=cells)
    return sampling_pairs(task, n_pairs, seed=seed, cells=cells)
