"""Does the decision check the candidate? Measures that run the model.

A decision that rejects wrong candidates more often than right ones may only predict difficulty.
Holding the question (or, in the step format, the state) fixed separates the two: teacher-force the
true product or step and the model's own wrong samples and compare the ACCEPT - REJECT logit at the
decision position (within-question AUC, logit gap, e+ / e-, corruption AUC, own log-probability
AUC), beside greedy and sampled accuracy and, for steps, episode accuracy with and without
reflection. :func:`heldout_metrics` is the table shipped with each checkpoint. The DS algebra on
finished rollouts lives in :mod:`tsds_interp.metrics`, the statistics in :mod:`tsds_interp.stats`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import config_of
from tsds_interp.objectives import token_logprobs
from tsds_interp.rollout import ACCEPTED, REJECTED, Rollouts, rollout, rollout_with_progress, sample_steps
from tsds_interp.stats import (
    above,
    between_auc,
    boot_mean,
    boot_ratio,
    mean_gap,
    percentile_interval,
    resample_index,
    wilson,
    within_auc,
)
from tsds_interp.task import (
    ACCEPT,
    REJECT,
    Questions,
    TaskConfig,
    answer_tokens,
    check_steps,
    corrupt_digit,
    corrupt_step_tokens,
    prompt_tokens,
    question_states,
    sample_questions,
    state_tokens,
    true_step_tokens,
)


def heldout_metrics(model, n_questions: int = 2048, n_ood: int = 256, seed: int = 99,
                    temperature: float = 1.0, verify_questions: int = 1200) -> pd.DataFrame:
    """The standard held-out evaluation: ``n_questions`` test-split questions (the set training
    evaluates on; cell ``all`` is theirs) plus ``n_ood`` out-of-distribution ones (their own
    cells), rolled out at ``temperature``; then, unless ``verify_questions`` is 0, the rows of
    :func:`verification_metrics` on that many test questions (8 samples each; adds cell ``hard``)."""
    task = config_of(model).task
    kw = dict(task=task, temperature=temperature, seed=seed)
    frames = [ds_metrics(rollout(model, sample_questions(task, "test", n_questions, seed=10_007), **kw))]
    if n_ood and task.ood_cells:
        ood = ds_metrics(rollout(model, sample_questions(task, "ood", n_ood, seed=10_009), **kw))
        frames.append(ood[ood.cell != "all"])
    if verify_questions:
        frames.append(verification_metrics(model, verify_questions, temperature=temperature, seed=seed))
    return pd.concat(frames, ignore_index=True)

MAX_QUESTIONS, MAX_SAMPLES, MAX_BOOT = 10**6, 1024, 10**6


@torch.no_grad()
def decision_scores(model, tokens: Int[Tensor, "n pos"], batch_size: int = 4096
                    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """ACCEPT - REJECT logit and P(ACCEPT) at the position after each row's last token (a candidate
    just written), teacher-forced."""
    if len(tokens) == 0:
        return torch.zeros(0), torch.zeros(0)
    device = next(model.parameters()).device
    gaps, p_acc = [], []
    for start in range(0, len(tokens), batch_size):
        logits = model(tokens[start : start + batch_size].to(device))[:, -1].float().cpu()
        gaps.append(logits[:, ACCEPT] - logits[:, REJECT])
        p_acc.append(logits.softmax(-1)[:, ACCEPT])
    return torch.cat(gaps), torch.cat(p_acc)


@dataclass
class VerificationData:
    """Per question: the true product's decision score and its own wrong samples' scores, by attempt.

    ``attempts[k]`` holds, for the (k+1)-th decision, arrays over questions that have enough wrong
    samples: ``q`` (question index), ``truth`` (score of the true product) and a list of wrong
    samples' scores; earlier attempts are the question's first k wrong samples, each REJECTed.
    ``p_acc_*`` are first-attempt P(ACCEPT) over every well-formed sample (for the gap split).
    """

    cells: np.ndarray                 # cell label per question
    greedy_correct: np.ndarray        # per question
    sample_correct: np.ndarray        # [question, sample], False where malformed
    sample_wellformed: np.ndarray     # [question, sample]
    slip: np.ndarray                  # [question, sample]: wrong sample, greedy answer right
    attempts: list[dict]
    p_acc_sample: np.ndarray          # [question, sample] P(ACCEPT | prompt + sample), nan if malformed
    p_acc_truth: np.ndarray           # [question]
    gap_truth: np.ndarray             # [question] ACCEPT-REJECT logit after the true product
    logprob_auc: np.ndarray | None = None  # per attempts[0] question: the same AUC from log pi(candidate)
    corruption_gap: np.ndarray | None = None  # [question]: logit gap, truth minus a one-digit corruption


def collect_verification(model, questions: Questions, samples: int = 8, temperature: float = 1.0,
                         seed: int = 0, task: TaskConfig | None = None) -> VerificationData:
    """The model's greedy answer and ``samples`` sampled first attempts per question, then
    teacher-forced decisions for the truth and the wrong samples (:func:`score_candidates`)."""
    task = task or config_of(model).task
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    greedy = rollout(model, questions, task=task, budget=1, temperature=0.0, seed=seed).values[:, 0]
    sampled = rollout_with_progress(model, questions.repeat_interleave(samples), "sampling candidates", task=task,
                                    budget=1, temperature=temperature, seed=seed + 1
                                    ).values[:, 0].view(len(questions), samples)
    v = score_candidates(questions, greedy, sampled, task, lambda t: decision_scores(model, t))
    v.logprob_auc = _logprob_auc(model, questions, sampled, v.attempts[0]["q"], task)
    truth = questions.a * questions.b
    corrupted = corrupt_digit(truth, task, np.random.default_rng(seed))
    gap, _ = decision_scores(model, torch.cat([prompt_tokens(questions.a, questions.b, task),
                                               answer_tokens(corrupted, task)], 1))
    v.corruption_gap = v.gap_truth - gap.numpy()
    return v


def _logprob_auc(model, questions: Questions, sampled, qs: np.ndarray, task: TaskConfig) -> np.ndarray:
    """Within-question AUC of a verifier that reads the model's own log-probability of the candidate
    (how much of the slip signal the sampling function already holds)."""
    if len(qs) == 0:
        return np.zeros(0)
    idx = torch.as_tensor(qs)
    q = questions[idx]
    truth = q.a * q.b
    wrong = [s[(s >= 0) & (s != t)] for s, t in zip(sampled[idx], truth)]
    counts = torch.tensor([len(w) for w in wrong])
    prompt = prompt_tokens(q.a, q.b, task)
    L = task.answer_len
    with torch.no_grad():
        def lp(t):
            return token_logprobs(model, t)[0][:, -L:].sum(1).numpy()
        lp_truth = lp(torch.cat([prompt, answer_tokens(truth, task)], 1))
        lp_wrong = lp(torch.cat([prompt.repeat_interleave(counts, 0), answer_tokens(torch.cat(wrong), task)], 1))
    return within_auc(lp_truth, np.split(lp_wrong, np.cumsum(counts.numpy())[:-1]))


Scorer = Callable[[Int[Tensor, "n pos"]], tuple[Float[Tensor, " n"], Float[Tensor, " n"]]]


def score_candidates(questions: Questions, greedy: Int[Tensor, " n"], sampled: Int[Tensor, "n samples"],
                     task: TaskConfig, scorer: Scorer, attempts: int | None = None) -> VerificationData:
    """Teacher-forced decision scores (``scorer``: tokens -> ACCEPT-REJECT logit and P(ACCEPT) after
    the last token) for the truth and the given candidates (-1 = malformed) of each question, at the
    first attempt and at every later attempt index (up to ``attempts``; default the task's budget)."""
    n, samples = sampled.shape
    truth = questions.a * questions.b
    wellformed = sampled >= 0
    correct = sampled == truth[:, None]
    wrong = wellformed & ~correct
    prompt = prompt_tokens(questions.a, questions.b, task)

    def answer(v):
        return answer_tokens(v.clamp(min=0), task)
    flat = torch.cat([prompt.repeat_interleave(samples, 0), answer(sampled.flatten())], 1)
    gap_flat, p_flat = (x.view(n, samples) for x in scorer(flat))
    p_acc_sample = torch.where(wellformed, p_flat, torch.nan).numpy()
    truth_gap, p_truth = scorer(torch.cat([prompt, answer(truth)], 1))
    wrong_lists = [sampled[i][wrong[i]] for i in range(n)]
    first = [i for i in range(n) if wrong[i].any()]
    n_attempts = attempts
    attempts = [{"q": np.array(first, dtype=int), "truth": truth_gap[first].numpy(),
                 "wrong": [gap_flat[i][wrong[i]].numpy() for i in first]}]
    attempts += [_attempt_scores(scorer, task, prompt, truth, wrong_lists, k)
                 for k in range(1, task.budget if n_attempts is None else n_attempts)]
    cells = np.array([TaskConfig.cell_name(c) for c in questions.cells])
    greedy_correct = (greedy == truth).numpy()
    return VerificationData(cells=cells, greedy_correct=greedy_correct, sample_correct=correct.numpy(),
                            sample_wellformed=wellformed.numpy(), slip=(wrong.numpy() & greedy_correct[:, None]),
                            attempts=attempts, p_acc_sample=p_acc_sample, p_acc_truth=p_truth.numpy(),
                            gap_truth=truth_gap.numpy())


def _attempt_scores(scorer: Scorer, task: TaskConfig, prompt, truth, wrong_lists, k: int) -> dict:
    """Decision scores at attempt ``k + 1`` (k >= 1): the prefix holds the question's first ``k``
    wrong samples, each followed by REJECT; compared are the truth and the remaining wrong samples."""
    qs = [i for i, w in enumerate(wrong_lists) if len(w) > k]
    if not qs:
        return {"q": np.zeros(0, int), "truth": np.zeros(0), "wrong": []}
    reject = torch.full((1,), REJECT)
    prefixes = [torch.cat([prompt[i], *[torch.cat([answer_tokens(w[None], task)[0], reject])
                                        for w in wrong_lists[i][:k]]]) for i in qs]
    prefixes = torch.stack(prefixes)
    rest = [wrong_lists[i][k:] for i in qs]
    counts = [len(r) for r in rest]
    idx = torch.tensor(qs)
    t, _ = scorer(torch.cat([prefixes, answer_tokens(truth[idx], task)], 1))
    w_tokens = torch.cat([prefixes.repeat_interleave(torch.tensor(counts), 0),
                          answer_tokens(torch.cat(rest), task)], 1)
    w, _ = scorer(w_tokens)
    return {"q": np.array(qs), "truth": t.numpy(), "wrong": np.split(w.numpy(), np.cumsum(counts)[:-1])}


def _row_writer(rows: list[dict], cell: str):
    """``add(metric, (value, lo, hi), n)`` appending one tidy row of ``cell`` to ``rows``."""
    def add(metric: str, stat, n) -> None:
        rows.append(dict(cell=cell, metric=metric, value=stat[0], lo=stat[1], hi=stat[2], n=int(n)))
    return add


def _accuracy_rows(add, greedy: np.ndarray, correct: np.ndarray, wrong: np.ndarray, slips: np.ndarray,
                   rng, n_boot: int) -> None:
    """Greedy accuracy (Wilson), sampled accuracy and the share of wrong samples that are slips
    (bootstrap over questions); ``correct``, ``wrong``, ``slips``: question x sample."""
    nq = len(greedy)
    add("greedy_accuracy", (greedy.mean() if nq else np.nan, *wilson(greedy.sum(), nq)), nq)
    add("sample_accuracy", boot_ratio(correct.sum(1).astype(float), np.full(nq, correct.shape[1], float), rng,
                                      n_boot), correct.size)
    add("slip_share", boot_ratio(slips.sum(1).astype(float), wrong.sum(1).astype(float), rng, n_boot), wrong.sum())


def _verification_rows(v: VerificationData, sel: np.ndarray, cell: str, rng, n_boot: int) -> list[dict]:
    rows = []
    add = _row_writer(rows, cell)
    nq = int(sel.sum())
    c = v.sample_correct[sel]
    wrong = v.sample_wellformed[sel] & ~c
    _accuracy_rows(add, v.greedy_correct[sel].astype(float), c, wrong, v.slip[sel], rng, n_boot)
    for k, att in enumerate(v.attempts, start=1):
        keep = sel[att["q"]]
        truth, wr = att["truth"][keep], [w for w, s in zip(att["wrong"], keep) if s]
        auc, gap = within_auc(truth, wr), mean_gap(truth, wr)
        add(f"within_auc@{k}", boot_mean(auc, rng, n_boot), len(auc))
        add(f"logit_gap@{k}", boot_mean(gap, rng, n_boot), len(gap))
        if k == 1:
            between = between_auc(truth, wr)
            qi = np.arange(len(truth))
            draws = []
            for _ in range(min(n_boot, 200)) if len(truth) > 1 else []:
                b = rng.choice(qi, len(qi))
                draws.append(between_auc(truth[b], [wr[i] for i in b]))
            lo, hi = percentile_interval(draws)
            add("between_auc", (between, lo, hi), len(truth))
        if k == 1 and v.logprob_auc is not None:
            lp = v.logprob_auc[keep]
            add("own_logprob_auc", boot_mean(lp, rng, n_boot), len(lp))
    if v.corruption_gap is not None:
        cg = v.corruption_gap[sel]
        add("corruption_auc", boot_mean(above(cg, 0.0), rng, n_boot), len(cg))
        add("corruption_gap", boot_mean(cg, rng, n_boot), len(cg))
    # Behavioural first-attempt accept gap over the model's own samples, split in two.
    p = np.nan_to_num(v.p_acc_sample[sel])
    p_truth = v.p_acc_truth[sel][:, None]
    n_c, n_w = c.sum(1).astype(float), wrong.sum(1).astype(float)
    acc_c, acc_w = (p * c).sum(1), (p * wrong).sum(1)
    truth_w = (p_truth * wrong).sum(1)
    idx = resample_index(nq, rng, n_boot)

    def split(ix):
        with np.errstate(invalid="ignore", divide="ignore"):
            mc = acc_c[ix].sum(-1) / n_c[ix].sum(-1)
            mw = acc_w[ix].sum(-1) / n_w[ix].sum(-1)
            mt = truth_w[ix].sum(-1) / n_w[ix].sum(-1)
        return mc - mw, mc - mt, mt - mw

    point = split(np.arange(nq))
    draws = split(idx)
    for name, value, d in zip(("accept_gap", "accept_gap_difficulty", "accept_gap_within"), point, draws):
        lo, hi = percentile_interval(d)
        add(name, (float(value), float(lo), float(hi)), n_w.sum())
    return rows


def _attempt_rates(r: Rollouts, sel: np.ndarray, cell: str) -> list[dict]:
    """p_{d|C} and p_{d|W} at each attempt index of full rollouts (Wilson intervals)."""
    dec, corr = r.decisions.numpy()[sel], r.correct.numpy()[sel]
    written = np.arange(dec.shape[1]) < r.n_attempts.numpy()[sel][:, None]
    rows = []
    for k in range(dec.shape[1]):
        for metric, base, hit in (("p_d_given_c", written[:, k] & corr[:, k], dec[:, k] == ACCEPTED),
                                  ("p_d_given_w", written[:, k] & ~corr[:, k], dec[:, k] == REJECTED)):
            m, x = int(base.sum()), int((base & hit).sum())
            lo, hi = wilson(x, m)
            rows.append(dict(cell=cell, metric=f"{metric}@{k + 1}", value=x / m if m else np.nan,
                             lo=float(lo), hi=float(hi), n=m))
    return rows


def hard_cells(task: TaskConfig) -> tuple[str, ...]:
    """The in-distribution cells with the most digits in all (2x3 and 3x2 for the small task)."""
    top = max(a + b for a, b in task.train_cells)
    return tuple(TaskConfig.cell_name(c) for c in task.train_cells if sum(c) == top)


def check_sampling(n_questions: int, samples: int, temperature: float, seed: int, n_boot: int,
                   min_questions: int = 1) -> None:
    """The rules of the studies that sample the model's own candidates (verify, probe)."""
    checks.number("questions", n_questions, lo=min_questions, hi=MAX_QUESTIONS, integer=True)
    checks.number("samples", samples, lo=1, hi=MAX_SAMPLES, integer=True)
    checks.number("temperature", temperature, lo=0, hi=100, lo_open=True)
    checks.seed(seed)
    checks.number("bootstrap", n_boot, lo=10, hi=MAX_BOOT, integer=True)


def verification_metrics(model, n_questions: int = 2400, samples: int = 8, temperature: float = 1.0,
                         seed: int = 0, n_boot: int = 1000, cells: tuple[str, ...] | None = None
                         ) -> pd.DataFrame:
    """Does the decision check the candidate? Tidy rows (cell, metric, value, lo, hi, n) per
    difficulty cell, for the hard cells together (``hard``) and for all (``all``), 95% intervals
    from a bootstrap over questions (Wilson for proportions of episodes):

    - ``within_auc@k``: paired AUC between the true product and the model's own wrong samples of
      the same question at the k-th decision (teacher-forced; 0.5 = the decision ignores the
      candidate, 1 = a perfect verifier); ``logit_gap@k``: mean ACCEPT-REJECT logit gap, truth
      minus wrong; ``between_auc``: truth of one question against wrong samples of others;
      ``own_logprob_auc``: the within-question AUC of the model's own log-probability of the
      candidate (what a verifier reading the sampling function's confidence would reach);
      ``corruption_auc`` / ``corruption_gap``: the truth against the truth with one digit changed;
    - ``accept_gap`` = P(ACCEPT | own right sample) - P(ACCEPT | own wrong sample) at the first
      attempt, = ``accept_gap_difficulty`` (wrong samples given their question's P(ACCEPT | truth))
      + ``accept_gap_within`` (the rest: what the decision sees in the candidate);
    - ``p_d_given_c@k`` / ``p_d_given_w@k`` from full rollouts at ``temperature`` (pooled rates are
      in :func:`ds_metrics`); ``greedy_accuracy``, ``sample_accuracy`` and ``slip_share`` (wrong
      samples whose question the greedy answer gets right).

    ``n_questions`` held-out questions spread over the task's in-distribution cells (or ``cells``),
    ``samples`` sampled first attempts each.
    """
    task = config_of(model).task
    check_sampling(n_questions, samples, temperature, seed, n_boot)
    if cells is not None:
        try:
            chosen = TaskConfig.parse_cells(cells)
        except (ValueError, AttributeError):
            raise ValueError(f"cells must be AxB cells such as 1x2, got {cells!r}") from None
        unknown = [c for c, t in zip(cells, chosen) if t not in task.train_cells]
        if unknown:
            raise ValueError(f"cells {unknown} are not in-distribution cells of this task "
                             f"({TaskConfig.format_cells(task.train_cells)})")
    else:
        chosen = None
    q = sample_questions(task, "test", n_questions, seed=10_007 + seed, cells=chosen)
    if task.steps:
        return step_verification_metrics(model, q, samples, temperature, seed, n_boot)
    v = collect_verification(model, q, samples=samples, temperature=temperature, seed=seed)
    r = rollout_with_progress(model, q, "full episodes", task=task, temperature=temperature, seed=seed + 2)
    return verification_table(v, hard_cells(task), r, n_boot, seed)


def verification_table(v: VerificationData, hard: tuple[str, ...] = (), r: Rollouts | None = None,
                       n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The rows of :func:`verification_metrics` from collected scores (and, for the decision rates
    by attempt, full rollouts of the same questions in the same order)."""
    rng = np.random.default_rng(seed)
    hard = np.isin(v.cells, hard)
    groups = [(c, v.cells == c) for c in sorted(set(v.cells))]
    groups += [("hard", hard)] if hard.any() else []
    groups += [("all", np.ones(len(v.cells), bool))]
    rows = []
    for name, sel in groups:
        rows += _verification_rows(v, sel, name, rng, n_boot)
        rows += _attempt_rates(r, sel, name) if r is not None else []
    return pd.DataFrame(rows)


@dataclass
class StepVerificationData:
    """Per state (one state of each question's correct episode): greedy and sampled steps and the
    decision's teacher-forced scores for the true step and each sampled step."""

    cells: np.ndarray            # [state] cell label of the question
    greedy_correct: np.ndarray   # [state]
    sample_correct: np.ndarray   # [state, sample]
    sample_wellformed: np.ndarray
    gap_truth: np.ndarray        # [state] ACCEPT-REJECT logit after the true step
    p_acc_truth: np.ndarray      # [state]
    gap_sample: np.ndarray       # [state, sample] (nan where malformed)
    p_acc_sample: np.ndarray     # [state, sample]
    logprob_truth: np.ndarray    # [state] log pi(true step | state)
    logprob_sample: np.ndarray   # [state, sample]
    corruption_gap: np.ndarray   # [state] logit gap, truth minus a one-digit corruption


@torch.no_grad()
def collect_step_verification(model, questions: Questions, samples: int = 8, temperature: float = 1.0,
                              seed: int = 0, task: TaskConfig | None = None) -> StepVerificationData:
    """For one uniformly drawn state of each question's correct episode: the greedy step, ``samples``
    steps at ``temperature``, and the decision read after the true step, after each sampled step and
    after a one-digit corruption of the true step (all teacher-forced)."""
    task = task or config_of(model).task
    n = len(questions)
    s = question_states(questions, task, seed + 5)
    P, L = task.prompt_len, task.answer_len
    prompt, truth = state_tokens(s, task), true_step_tokens(s, task)
    greedy = sample_steps(model, s, task, 0.0, seed=seed)[0][:, P : P + L]
    idx = torch.arange(n).repeat_interleave(samples)
    sampled = sample_steps(model, s[idx], task, temperature, seed=seed + 1)[0][:, P : P + L]
    wellformed = (sampled <= 9).all(1)
    correct = check_steps(s[idx], sampled.clamp(max=9), task) & wellformed

    def score(steps, pr):
        return decision_scores(model, torch.cat([pr, steps.clamp(max=9)], 1))
    gap_t, p_t = score(truth, prompt)
    gap_s, p_s = score(sampled, prompt[idx])
    corrupted = corrupt_step_tokens(truth, task, np.random.default_rng(seed))
    gap_c, _ = score(corrupted, prompt)

    def lp(steps, pr):
        return token_logprobs(model, torch.cat([pr, steps.clamp(max=9)], 1))[0][:, -L:].sum(1)
    shape = (n, samples)

    def nan_bad(x):
        return torch.where(wellformed, x, torch.nan).view(shape).numpy()
    return StepVerificationData(
        cells=np.array([TaskConfig.cell_name(c) for c in questions.cells]),
        greedy_correct=check_steps(s, greedy.clamp(max=9), task).numpy() & (greedy <= 9).all(1).numpy(),
        sample_correct=correct.view(shape).numpy(), sample_wellformed=wellformed.view(shape).numpy(),
        gap_truth=gap_t.numpy(), p_acc_truth=p_t.numpy(), gap_sample=nan_bad(gap_s), p_acc_sample=nan_bad(p_s),
        logprob_truth=lp(truth, prompt).numpy(), logprob_sample=nan_bad(lp(sampled, prompt[idx])),
        corruption_gap=(gap_t - gap_c).numpy())


def _step_verification_rows(v: StepVerificationData, sel: np.ndarray, cell: str, rng, n_boot: int) -> list[dict]:
    rows = []
    add = _row_writer(rows, cell)
    c = v.sample_correct[sel]
    wrong = v.sample_wellformed[sel] & ~c
    _accuracy_rows(add, v.greedy_correct[sel].astype(float), c, wrong, wrong & v.greedy_correct[sel][:, None],
                   rng, n_boot)
    has = wrong.any(1)
    for name, truth, sample in (("within_auc@1", v.gap_truth, v.gap_sample),
                                ("own_logprob_auc", v.logprob_truth, v.logprob_sample)):
        t, w = truth[sel][has], [x[m] for x, m in zip(sample[sel][has], wrong[has])]
        auc, gap = within_auc(t, w), mean_gap(t, w)
        add(name, boot_mean(auc, rng, n_boot), len(auc))
        if name == "within_auc@1":
            add("logit_gap@1", boot_mean(gap, rng, n_boot), len(gap))
    p = np.nan_to_num(v.p_acc_sample[sel])
    add("e_plus@1", boot_ratio((p * wrong).sum(1), wrong.sum(1).astype(float), rng, n_boot), wrong.sum())
    add("e_minus@1", boot_ratio(((1 - p) * c).sum(1), c.sum(1).astype(float), rng, n_boot), c.sum())
    cg = v.corruption_gap[sel]
    add("corruption_auc", boot_mean(above(cg, 0.0), rng, n_boot), len(cg))
    add("corruption_gap", boot_mean(cg, rng, n_boot), len(cg))
    return rows


def _episode_rows(with_r, without_r, sel: np.ndarray, cell: str, rng, n_boot: int) -> list[dict]:
    """Episode accuracy with reflection and without it (budget 1: every first step is taken), and
    their paired difference."""
    a, b = with_r.final_correct.numpy()[sel].astype(float), without_r.final_correct.numpy()[sel].astype(float)
    n = int(sel.sum())
    rows = []
    for metric, x in (("episode_accuracy", a), ("episode_accuracy_no_reflection", b)):
        lo, hi = wilson(int(x.sum()), n)
        rows.append(dict(cell=cell, metric=metric, value=x.mean() if n else np.nan, lo=float(lo), hi=float(hi), n=n))
    gain = boot_mean(a - b, rng, n_boot)
    rows.append(dict(cell=cell, metric="reflection_gain", value=gain[0], lo=gain[1], hi=gain[2], n=n))
    return rows


def step_verification_metrics(model, q: Questions, samples: int = 8, temperature: float = 1.0, seed: int = 0,
                              n_boot: int = 1000) -> pd.DataFrame:
    """Step-format verification, per cell, ``hard`` and ``all`` (95% intervals, bootstrap over states
    or Wilson): on one state per question, ``within_auc@1`` and ``logit_gap@1`` (true step vs the
    model's own wrong steps from the same state), ``e_plus@1`` = P(ACCEPT | own wrong step) and
    ``e_minus@1`` = P(REJECT | own right step) at the first attempt (expected over the decision's
    distribution), ``own_logprob_auc``, ``corruption_auc`` / ``_gap``, greedy / sampled step accuracy and
    ``slip_share``; and from full episodes at ``temperature``, ``episode_accuracy``,
    ``episode_accuracy_no_reflection`` (budget 1) and their paired difference ``reflection_gain``."""
    task = config_of(model).task
    v = collect_step_verification(model, q, samples, temperature, seed, task)
    with_r = rollout_with_progress(model, q, "full episodes", task=task, temperature=temperature, seed=seed + 2)
    without_r = rollout_with_progress(model, q, "episodes without reflection", task=task, budget=1,
                                      temperature=temperature, seed=seed + 2)
    rng = np.random.default_rng(seed)
    hard = np.isin(v.cells, hard_cells(task))
    groups = [(c, v.cells == c) for c in sorted(set(v.cells))]
    groups += [("hard", hard)] if hard.any() else []
    groups += [("all", np.ones(len(v.cells), bool))]
    rows = []
    for name, sel in groups:
        rows += _step_verification_rows(v, sel, name, rng, n_boot)
        rows += _episode_rows(with_r, without_r, sel, name, rng, n_boot)
    return pd.DataFrame(rows)
