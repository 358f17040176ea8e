"""Batched, KV-cached, multi-turn reflective rollouts.

The model writes a candidate (``answer_len`` tokens), then one decision token. ACCEPT ends the
episode; REJECT starts a new attempt, up to ``budget`` attempts (the last candidate is then final
whatever the decision says). A non-digit token inside a candidate or a non-decision token at a
decision position ends the episode as *malformed*: the answer counts as wrong. EOS is appended
after the last token, so every trajectory fits in ``task.max_len``.

Sampling draws one uniform number per (row, step) from ``seed`` up front and inverts the CDF, so
the same seed gives the same tokens whether rows are decoded with the KV cache, without it, alone
or in any batch. Rows that finish leave the batch (and the cache) at once.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tsds_interp import checks
from tsds_interp.forward import KVCache, use_own_weights
from tsds_interp.model import task_of
from tsds_interp.task import (
    ACCEPT,
    EOS,
    PAD,
    REJECT,
    Questions,
    States,
    TaskConfig,
    check_steps,
    next_states,
    parse_candidate,
    prompt_tokens,
    state_tokens,
    token_roles,
)

# Decision codes in Rollouts.decisions
ACCEPTED, REJECTED, INVALID, NOT_REACHED = 1, 0, -1, -2


@dataclass
class Rollouts:
    """A batch of reflective episodes. ``K`` is the attempt budget, ``L`` the candidate length."""

    a: Int[Tensor, " batch"]
    b: Int[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    roles: Int[Tensor, "batch pos"]
    logprobs: Float[Tensor, "batch pos"]          # log pi(token | prefix) at temperature 1; 0 if not sampled
    candidates: Int[Tensor, "batch K L"]          # PAD where not written
    values: Int[Tensor, "batch K"]                # parsed candidate, -1 if invalid or not written
    correct: Bool[Tensor, "batch K"]
    decisions: Int[Tensor, "batch K"]             # ACCEPTED / REJECTED / INVALID / NOT_REACHED
    n_attempts: Int[Tensor, " batch"]
    malformed: Bool[Tensor, " batch"]
    final_correct: Bool[Tensor, " batch"]

    @property
    def reward(self) -> Float[Tensor, " batch"]:
        return self.final_correct.float()

    @property
    def questions(self) -> Questions:
        return Questions(self.a, self.b)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> Rollouts:
        return Rollouts(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        return Rollouts(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                           for f in fields(Rollouts)})


# ---------------------------------------------------------------- steppers

class UncachedStepper:
    """Reference decoder: re-runs the hooked model on the whole prefix for every token."""
    def __init__(self, model, batch: int, max_len: int):
        self.model = model
        self.tokens: Tensor | None = None

    def _last_logits(self) -> Tensor:
        return self.model(self.tokens)[:, -1]

    def prefill(self, prompt):
        self.tokens = prompt
        return self._last_logits()

    def step(self, token):
        self.tokens = torch.cat([self.tokens, token[:, None]], 1)
        return self._last_logits()

    def keep(self, rows):
        self.tokens = self.tokens[rows]


# ---------------------------------------------------------------- sampling

def sample_tokens(logits: Float[Tensor, "batch vocab"], temperature: float,
                  u: Float[Tensor, " batch"]) -> Int[Tensor, " batch"]:
    """Inverse-CDF sample at ``temperature`` from pre-drawn uniforms; greedy when it is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, u.double()[:, None].contiguous()).squeeze(1).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def rollout(model, questions: Questions, *, task: TaskConfig | None = None, budget: int | None = None,
            temperature: float = 1.0, decision_temperature: float | None = None, seed: int = 0,
            batch_size: int = 2048, cached: bool = True, rows: slice | None = None) -> Rollouts:
    """Reflective episodes for ``questions``.

    ``temperature`` applies to sample tokens, ``decision_temperature`` (default: the same) to
    decision tokens; 0 is greedy. ``budget`` overrides the task's attempt budget. ``cached=True``
    decodes with a key/value cache on the model's own weights where :mod:`tsds_interp.forward` allows
    it (else through the hooked model); ``cached=False``
    decodes without a KV cache through the hooked model (the reference the cache is tested against).
    ``rows`` rolls out only those rows of ``questions``, with the random draws they get in the full
    batch (how data-parallel processes split one batch and still match a single process).
    A step-format task returns :class:`StepRollouts` (see :func:`step_rollout`).
    """
    task, dtemp = _rollout_settings(model, questions, task, budget, temperature, decision_temperature,
                                    seed, batch_size)
    if rows is not None and (not isinstance(rows, slice) or not range(len(questions))[rows]):
        raise ValueError(f"rows must be a slice selecting at least one of the {len(questions)} questions, "
                         f"got {rows!r}")
    if task.steps:
        return _warn_if_all_malformed(_step_rollout(model, questions, task, temperature, dtemp, seed, batch_size,
                                                    cached, rows))
    n_steps = task.budget * task.attempt_len
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(questions), n_steps, generator=gen, dtype=torch.float64)
    if rows is not None:
        questions, uniforms = questions[rows], uniforms[rows]
    device = next(model.parameters()).device
    decoder = KVCache if cached and use_own_weights(model, "rollout") else UncachedStepper
    parts = []
    for start in range(0, len(questions), batch_size):
        sl = slice(start, start + batch_size)
        parts.append(_rollout_batch(model, questions[sl], uniforms[sl], task, temperature, dtemp,
                                    decoder, device))
    return _warn_if_all_malformed(Rollouts.cat(parts))


class LongRunWarning(UserWarning):
    """A requested run would take hours."""


LONG_RUN_S = 3600.0  # an estimate above this gets a warning before the run goes on


def progress(items, desc: str, unit: str = "it", quiet: bool = False, size=lambda item: 1, total: int | None = None):
    """``items`` with a progress bar and time estimate (on a terminal, unless ``quiet``; an item counts
    ``size(item)`` units of ``total``), and a :class:`LongRunWarning` when, after the first item, the
    estimate for all of them passes :data:`LONG_RUN_S`: the run goes on, Ctrl-C stops it."""
    total = sum(map(size, items)) if total is None else total
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit=unit, disable=True if quiet else None) as bar:
        for i, item in enumerate(items):
            yield item
            bar.update(size(item))
            if i == 0 and (estimate := (time.perf_counter() - start) * total / max(size(item), 1)) > LONG_RUN_S:
                warnings.warn(f"{desc}: {total} {unit}s will take about {estimate / 3600:.1f} h at this rate; "
                              "Ctrl-C stops the run, a smaller size shortens it", LongRunWarning,
                              stacklevel=_callers_level(sys._getframe()))


def rollout_with_progress(model, questions: Questions, desc: str = "rollouts", chunk: int = 256, **kw):
    """:func:`rollout` of ``questions`` in row chunks (the very episodes of one call: ``rows`` keeps
    each row's random draws) with :func:`progress`'s bar, estimate and warning."""
    n = len(questions)
    if n <= chunk:
        return rollout(model, questions, **kw)
    starts = range(0, n, chunk)
    parts = [rollout(model, questions, rows=slice(lo, lo + chunk), **kw)
             for lo in progress(starts, desc, "episode", size=lambda lo: min(chunk, n - lo), total=n)]
    return type(parts[0]).cat(parts)


class MalformedWarning(UserWarning):
    """Every episode of a rollout is malformed."""


def _warn_if_all_malformed(r):
    if len(r) > 1 and bool(r.malformed.all()):
        warnings.warn(f"all {len(r)} episodes are malformed (the model never wrote a well-formed candidate and "
                      "decision): is it trained on this task format?", MalformedWarning,
                      stacklevel=_callers_level(sys._getframe()))
    return r


def _callers_level(frame) -> int:
    """The ``stacklevel`` for a warning raised in ``frame`` that names the first line outside this
    package and the installed libraries (``torch.no_grad``'s wrapper among them): where the user called in."""
    inside = tuple({os.path.dirname(os.path.abspath(__file__)) + os.sep,
                    *(os.path.abspath(sysconfig.get_path(k)) + os.sep for k in ("purelib", "platlib"))})
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _rollout_settings(model, questions, task, budget, temperature, decision_temperature, seed, batch_size):
    task = task_of(model, task)
    if budget is not None:
        task = TaskConfig(**{**task.to_dict(), "budget": budget})
    if not isinstance(questions, Questions):
        raise ValueError(f"questions must be a tsds_interp.task.Questions (e.g. from sample_questions), got "
                         f"{type(questions).__name__}")
    if questions.a.ndim != 1 or questions.a.shape != questions.b.shape:
        raise ValueError(f"questions' operands must be two 1-d tensors of one length, got shapes "
                         f"{tuple(questions.a.shape)} and {tuple(questions.b.shape)}")
    if len(questions) == 0:
        raise ValueError("no questions to roll out; pass at least one")
    checks.number("temperature", temperature, lo=0, hi=100)
    if decision_temperature is not None:
        checks.number("decision_temperature", decision_temperature, lo=0, hi=100)
    checks.seed(seed)
    checks.number("batch_size", batch_size, lo=1, hi=2**24, integer=True)
    return task, temperature if decision_temperature is None else decision_temperature


def _rollout_batch(model, q: Questions, uniforms, task: TaskConfig, temp: float, dtemp: float,
                   decoder: type, device) -> Rollouts:
    n, K, L, P = len(q), task.budget, task.answer_len, task.prompt_len
    tokens = torch.full((n, task.max_len), PAD, dtype=torch.long, device=device)
    tokens[:, :P] = prompt_tokens(q.a, q.b, task).to(device)
    logprobs = torch.zeros(n, task.max_len, device=device)
    decisions = torch.full((n, K), NOT_REACHED, dtype=torch.long, device=device)
    malformed = torch.zeros(n, dtype=torch.bool, device=device)
    active = torch.arange(n, device=device)
    uniforms = uniforms.to(device)
    stepper = decoder(model, n, task.max_len)
    logits = stepper.prefill(tokens[:, :P])
    for t in range(K * task.attempt_len):
        pos, attempt, offset = P + t, t // task.attempt_len, t % task.attempt_len
        is_decision = offset == L
        token = sample_tokens(logits, dtemp if is_decision else temp, uniforms[active, t])
        tokens[active, pos] = token
        logprobs[active, pos] = logits.float().log_softmax(-1).gather(1, token[:, None]).squeeze(1)
        if is_decision:
            valid = (token == ACCEPT) | (token == REJECT)
            decisions[active, attempt] = torch.where(
                valid, (token == ACCEPT).long(), torch.full_like(token, INVALID))
            finished = (token != REJECT) | (attempt == K - 1)
            bad = ~valid
        else:
            bad = token > 9
            finished = bad
        malformed[active[bad]] = True
        if finished.any():
            ends = active[finished & (token != EOS)]  # a model that wrote EOS itself needs no other
            tokens[ends, pos + 1] = EOS
            active = active[~finished]
            stepper.keep(~finished)
            token = token[~finished]
        if len(active) == 0 or t == K * task.attempt_len - 1:
            break
        logits = stepper.step(token)
    return _summarize(q, tokens.cpu(), logprobs.cpu(), decisions.cpu(), malformed.cpu(), task)


def _summarize(q: Questions, tokens, logprobs, decisions, malformed, task: TaskConfig) -> Rollouts:
    n, K, L, P = len(q), task.budget, task.answer_len, task.prompt_len
    attempts = tokens[:, P : P + K * task.attempt_len].reshape(n, K, task.attempt_len)
    candidates = attempts[:, :, :L]
    written = decisions != NOT_REACHED
    # A malformed candidate (episode ended inside it) is also written: its first token exists.
    written |= (candidates[:, :, 0] != PAD) & (candidates[:, :, 0] != EOS)
    values = parse_candidate(candidates.reshape(n * K, L), task).reshape(n, K)
    values = torch.where(written, values, torch.full_like(values, -1))
    candidates = torch.where(written[:, :, None], candidates, torch.full_like(candidates, PAD))
    correct = written & (values == (q.a * q.b)[:, None])
    n_attempts = written.sum(1)
    last = (n_attempts - 1).clamp(min=0)
    final_correct = correct[torch.arange(n), last] & ~malformed
    return Rollouts(a=q.a, b=q.b, tokens=tokens, roles=token_roles(tokens, task), logprobs=logprobs,
                    candidates=candidates, values=values, correct=correct, decisions=decisions,
                    n_attempts=n_attempts, malformed=malformed, final_correct=final_correct)


# ---------------------------------------------------------------- step format episodes

@dataclass
class StepRollouts:
    """Step-format episodes: per episode (``n``) the question and outcome, per attempt (``m``, every
    call's every attempt, grouped by episode in the order made) its tokens ``BOS state step decision EOS``."""

    a: Int[Tensor, " n"]
    b: Int[Tensor, " n"]
    final_value: Int[Tensor, " n"]            # running sum of the last taken step; -1 if none or malformed
    final_correct: Bool[Tensor, " n"]
    n_calls: Int[Tensor, " n"]                 # calls made (steps taken, the malformed one included)
    malformed: Bool[Tensor, " n"]              # a non-digit step token or a non-decision decision token
    episode: Int[Tensor, " m"]
    call: Int[Tensor, " m"]
    attempt: Int[Tensor, " m"]
    tokens: Int[Tensor, "m pos"]
    roles: Int[Tensor, "m pos"]
    logprobs: Float[Tensor, "m pos"]
    step_correct: Bool[Tensor, " m"]           # the checker's label of the step against its own state
    decisions: Int[Tensor, " m"]               # ACCEPTED / REJECTED / INVALID (NOT_REACHED if malformed step)
    taken: Bool[Tensor, " m"]                  # the step the episode went on with (accepted or last)
    budget: int = 1                            # attempts per call

    @property
    def reward(self) -> Float[Tensor, " n"]:
        return self.final_correct.float()

    @property
    def questions(self) -> Questions:
        return Questions(self.a, self.b)

    @property
    def n_attempts(self) -> Int[Tensor, " n"]:
        """Attempts per episode, all calls together."""
        return torch.bincount(self.episode, minlength=len(self))

    def __len__(self) -> int:
        return self.a.shape[0]

    @staticmethod
    def cat(parts: list[StepRollouts]) -> StepRollouts:
        """Episodes of several batches in order (attempts' episode indices shifted to match)."""
        out, offset = [], 0
        for part in parts:
            out.append(replace(part, episode=part.episode + offset))
            offset += len(part)
        return StepRollouts(**{f.name: torch.cat([getattr(p, f.name) for p in out]) if f.name != "budget"
                               else parts[0].budget for f in fields(StepRollouts)})


def _step_rollout(model, q: Questions, task: TaskConfig, temp: float, dtemp: float, seed: int,
                  batch_size: int, cached: bool, rows: slice | None) -> StepRollouts:
    """Episodes as chains of calls. Each round, every live episode makes one attempt from its current
    state (all of them batched): the step at ``temp``, the decision at ``dtemp``. ACCEPT, or the
    ``budget``-th attempt, takes the step: the next state is the one it wrote, and the episode ends
    when that state's y is 0 (the answer is its r) or after ``max_calls`` calls; REJECT resamples from
    the same state (the rejected step is not in context). A malformed step or decision ends it."""
    n_rounds = task.max_calls * task.budget
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(q), n_rounds, task.attempt_len, generator=gen, dtype=torch.float64)
    if rows is not None:
        q, uniforms = q[rows], uniforms[rows]
    device = next(model.parameters()).device
    decoder = KVCache if cached and use_own_weights(model, "step rollout") else UncachedStepper
    n = len(q)
    state = States(q.a.clone(), q.b.clone(), torch.zeros_like(q.a))
    call, attempt = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    final_value, malformed = torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    live = torch.arange(n)
    parts = []
    for rnd in range(n_rounds):
        if len(live) == 0:
            break
        s = state[live]
        tokens, logprobs = _decode_attempts(model, decoder, state_tokens(s, task), uniforms[live, rnd],
                                            task, temp, dtemp, batch_size, device)
        step = tokens[:, task.prompt_len : task.prompt_len + task.answer_len]
        dec_tok = tokens[:, task.prompt_len + task.answer_len]
        bad_step = (step > 9).any(1)
        valid_dec = (dec_tok == ACCEPT) | (dec_tok == REJECT)
        bad = bad_step | ~valid_dec
        decisions = torch.where(valid_dec, (dec_tok == ACCEPT).long(), torch.full_like(dec_tok, INVALID))
        decisions[bad_step] = NOT_REACHED
        taken = ~bad & ((dec_tok == ACCEPT) | (attempt[live] == task.budget - 1))
        correct = check_steps(s, step.clamp(max=9), task) & ~bad_step
        tokens, logprobs = _end_attempts(tokens, logprobs, task)
        parts.append(dict(episode=live, call=call[live], attempt=attempt[live], tokens=tokens,
                          roles=token_roles(tokens, task), logprobs=logprobs, step_correct=correct,
                          decisions=decisions, taken=taken))
        nxt = next_states(s, step, task)
        moved = live[taken]
        state.y[moved], state.r[moved] = nxt.y[taken], nxt.r[taken]
        call[moved] += 1
        attempt[moved] = 0
        attempt[live[~taken & ~bad]] += 1
        malformed[live[bad]] = True
        solved = taken & (nxt.y == 0)
        final_value[live[solved]] = nxt.r[solved]
        over = taken & (call[live] >= task.max_calls)
        live = live[~(bad | solved | over)]
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.sort(cat["episode"], stable=True).indices  # by episode, each in the order made
    cat = {k: v[order] for k, v in cat.items()}
    final_correct = (final_value == q.a * q.b) & ~malformed
    return StepRollouts(a=q.a, b=q.b, final_value=final_value, final_correct=final_correct,
                        n_calls=call + malformed.long(), malformed=malformed, budget=task.budget, **cat)


@torch.no_grad()
def sample_steps(model, states: States, task: TaskConfig, temperature: float = 1.0, seed: int = 0,
                 decision_temperature: float | None = None, batch_size: int = 2048, cached: bool = True
                 ) -> tuple[Int[Tensor, "n pos"], Float[Tensor, "n pos"]]:
    """One attempt (``BOS state step decision EOS``) per state, as :func:`rollout` draws them
    (KV-cached where exact unless ``cached=False``, temperature 0 greedy); tokens and their
    log-probs at temperature 1."""
    task = task_of(model, task)
    if len(states) == 0:
        raise ValueError("no states to sample steps from; pass at least one")
    checks.number("temperature", temperature, lo=0, hi=100)
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(states), task.attempt_len, generator=gen, dtype=torch.float64)
    decoder = KVCache if cached and use_own_weights(model, "step sampling") else UncachedStepper
    dtemp = temperature if decision_temperature is None else decision_temperature
    tokens, logprobs = _decode_attempts(model, decoder, state_tokens(states, task), uniforms, task, temperature,
                                        dtemp, batch_size, next(model.parameters()).device)
    return _end_attempts(tokens, logprobs, task)


def _decode_attempts(model, decoder: type, prompt: Int[Tensor, "n p"], uniforms: Float[Tensor, "n t"],
                     task: TaskConfig, temp: float, dtemp: float, batch_size: int, device
                     ) -> tuple[Int[Tensor, "n pos"], Float[Tensor, "n pos"]]:
    """One attempt (step and decision) per prompt; tokens end with EOS, log-probs at temperature 1."""
    n, P = prompt.shape
    tokens = torch.full((n, task.max_len), EOS, dtype=torch.long)
    tokens[:, :P] = prompt
    logprobs = torch.zeros(n, task.max_len)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        stepper = decoder(model, len(prompt[sl]), task.max_len)
        logits = stepper.prefill(prompt[sl].to(device))
        for t in range(task.attempt_len):
            token = sample_tokens(logits, dtemp if t == task.answer_len else temp, uniforms[sl, t].to(device))
            tokens[sl, P + t] = token.cpu()
            logprobs[sl, P + t] = logits.float().log_softmax(-1).gather(1, token[:, None]).squeeze(1).cpu()
            if t < task.attempt_len - 1:
                logits = stepper.step(token)
    return tokens, logprobs


def _end_attempts(tokens: Tensor, logprobs: Tensor, task: TaskConfig) -> tuple[Tensor, Tensor]:
    """An attempt ends at its first malformed token: EOS after it (unless it is EOS), PAD beyond."""
    P, L = task.prompt_len, task.answer_len
    body = tokens[:, P : P + L + 1]
    bad = torch.cat([body[:, :L] > 9, ~((body[:, L:] == ACCEPT) | (body[:, L:] == REJECT))], 1)
    first = torch.where(bad.any(1), bad.float().argmax(1), torch.full((len(tokens),), L)) + P
    pos = torch.arange(tokens.shape[1])
    after = pos[None] > first[:, None]
    tokens = torch.where(after, PAD, tokens)
    ends = tokens[torch.arange(len(tokens)), first] != EOS
    tokens[ends, first[ends] + 1] = EOS
    return tokens, torch.where(after, 0.0, logprobs)


__all__ = ["Rollouts", "StepRollouts", "rollout", "sample_steps", "sample_tokens", "UncachedStepper",
           "ACCEPTED", "REJECTED", "INVALID", "NOT_REACHED"]
