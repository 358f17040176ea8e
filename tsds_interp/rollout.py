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

from dataclasses import dataclass, fields

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.forward import KVCache, use_own_weights
from tsds_interp.model import config_of
from tsds_interp.task import (
    ACCEPT,
    EOS,
    PAD,
    REJECT,
    Questions,
    TaskConfig,
    parse_candidate,
    prompt_tokens,
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
    return torch.searchsorted(cdf, u.double()[:, None]).squeeze(1).clamp(max=logits.shape[-1] - 1)


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
    """
    task = task or config_of(model).task
    if budget is not None:
        task = TaskConfig(**{**task.to_dict(), "budget": budget})
    if len(questions) == 0:
        raise ValueError("no questions to roll out; pass at least one")
    checks.number("temperature", temperature, lo=0, hi=100)
    if decision_temperature is not None:
        checks.number("decision_temperature", decision_temperature, lo=0, hi=100)
    checks.seed(seed)
    checks.number("batch_size", batch_size, lo=1, hi=2**24, integer=True)
    dtemp = temperature if decision_temperature is None else decision_temperature
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
    return Rollouts.cat(parts)


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


__all__ = ["Rollouts", "rollout", "sample_tokens", "UncachedStepper",
           "ACCEPTED", "REJECTED", "INVALID", "NOT_REACHED"]
