"""The reflective multiplication task: vocabulary, questions, trajectory format, roles, checker.

A trajectory is ``BOS a * b = s_1 d_1 s_2 d_2 ... s_k d_k EOS PAD...`` where

- operands are written most-significant digit first, zero-padded to ``width`` digits, so every
  prompt has the same length (``prompt_len = 2 * width + 3``);
- a candidate ``s_i`` is exactly ``answer_len = 2 * width`` digit tokens: the product, zero-padded,
  least-significant digit first by default (``answer_order="reversed"``, the order in which
  long multiplication produces digits, which small transformers learn far more easily) or
  most-significant first (``answer_order="forward"``);
- a decision ``d_i`` is one ACCEPT or REJECT token. The episode ends at the first ACCEPT or after
  ``budget`` attempts; EOS is then appended (it is not a model choice) and the rest is PAD.

Because every candidate has the same length, the role of a position (prompt, sample, decision,
end, pad) is fixed by the format: :func:`token_roles` is the one function that says which.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tsds_interp import checks

DIGITS = [str(i) for i in range(10)]
VOCAB: tuple[str, ...] = (*DIGITS, "*", "=", "<bos>", "<eos>", "<pad>", "<accept>", "<reject>")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
MUL, EQ, BOS, EOS, PAD, ACCEPT, REJECT = (
    TOKEN_ID[t] for t in ("*", "=", "<bos>", "<eos>", "<pad>", "<accept>", "<reject>")
)

# Token roles. Sample and decision are the two stages of the DS hypothesis.
PROMPT, SAMPLE, DECISION, END, PADDING = 0, 1, 2, 3, 4
ROLE_NAMES = ("prompt", "sample", "decision", "end", "pad")

Cell = tuple[int, int]
MAX_WIDTH = 9  # the product of two 10-digit numbers overflows 64-bit integers
MAX_BUDGET = 64


def _default_train_cells() -> tuple[Cell, ...]:
    return ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2))


@dataclass(frozen=True)
class TaskConfig:
    """Everything that fixes the token format and the question distribution.

    ``train_cells`` are the in-distribution difficulty cells (digits of a, digits of b); a
    deterministic hash of each question puts ``test_fraction`` of them in the held-out test split.
    ``ood_cells`` are never trained on. ``task_format="oneshot"`` writes the product as one
    candidate; ``"steps"`` solves it as a chain of reflective calls over reduced states (the
    section "Step format" below; ``budget`` is then the attempts per call).
    """

    width: int = 3
    budget: int = 3
    answer_order: Literal["reversed", "forward"] = "reversed"
    task_format: Literal["oneshot", "steps"] = "oneshot"
    train_cells: tuple[Cell, ...] = field(default_factory=_default_train_cells)
    ood_cells: tuple[Cell, ...] = ((3, 3),)
    test_fraction: float = 0.1

    def __post_init__(self):
        checks.number("width", self.width, lo=1, hi=MAX_WIDTH, integer=True)
        checks.number("budget", self.budget, lo=1, hi=MAX_BUDGET, integer=True)
        checks.number("test_fraction", self.test_fraction, lo=0, hi=0.99, lo_open=True)
        object.__setattr__(self, "train_cells", _cells("train_cells", self.train_cells))
        object.__setattr__(self, "ood_cells", _cells("ood_cells", self.ood_cells))
        if self.task_format not in ("oneshot", "steps"):
            raise ValueError(f"task_format must be 'oneshot' or 'steps', got {self.task_format!r}")
        if self.answer_order not in ("reversed", "forward"):
            raise ValueError(f"answer_order must be 'reversed' or 'forward', got {self.answer_order!r}")
        for da, db in (*self.train_cells, *self.ood_cells):
            if not (1 <= da <= self.width and 1 <= db <= self.width):
                raise ValueError(f"cell ({da}, {db}): each operand has 1 to width={self.width} digits")
        if not self.train_cells:
            raise ValueError("train_cells is empty: give at least one (digits_a, digits_b) cell")

    @property
    def steps(self) -> bool:
        """True for the step format (one sequence per call: ``BOS state step decision EOS``)."""
        return self.task_format == "steps"

    @property
    def prompt_len(self) -> int:
        """One-shot: ``BOS a * b =``; steps: ``BOS x * y = r``."""
        return 4 * self.width + 3 if self.steps else 2 * self.width + 3

    @property
    def answer_len(self) -> int:
        """One-shot: the candidate product; steps: the step ``u y' p r'``."""
        return 5 * self.width + 1 if self.steps else 2 * self.width

    @property
    def max_calls(self) -> int:
        """Steps: the most calls an episode makes (one per digit of y)."""
        return self.width

    @property
    def attempt_len(self) -> int:
        """Tokens per attempt: the candidate plus its decision."""
        return self.answer_len + 1

    @property
    def max_len(self) -> int:
        """Length of a full-budget trajectory including the final EOS (steps: of one attempt of a
        call; the rejected step is not in the next attempt's context)."""
        return self.prompt_len + (1 if self.steps else self.budget) * self.attempt_len + 1

    # -- difficulty cells: "AxB" = a has A digits, b has B digits
    @staticmethod
    def cell_name(cell: Cell) -> str:
        """``(1, 2)`` -> ``"1x2"``."""
        return f"{cell[0]}x{cell[1]}"

    @staticmethod
    def parse_cells(text: str | tuple[str, ...] | list[str], what: str = "cells") -> tuple[Cell, ...]:
        """``"1x2,2x1"`` (or ``["1x2", "2x1"]``) -> ``((1, 2), (2, 1))``, with a clear error."""
        names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
        try:
            return tuple((int(a), int(b)) for a, b in (c.split("x") for c in names))
        except (ValueError, AttributeError):
            raise ValueError(f"{what} are comma-separated AxB cells such as 1x2,2x1; got {text!r}") from None

    @classmethod
    def cell_names(cls, cells) -> list[str]:
        """``((1, 2), (2, 1))`` -> ``["1x2", "2x1"]``."""
        return [cls.cell_name(c) for c in cells]

    @classmethod
    def format_cells(cls, cells) -> str:
        """``((1, 2), (2, 1))`` -> ``"1x2,2x1"``."""
        return ",".join(cls.cell_names(cells))

    def in_distribution(self, cells: str | tuple[str, ...] | list[str]) -> tuple[Cell, ...]:
        """Named in-distribution cells (``"1x2,2x1"`` or a list of names), checked against ``train_cells``."""
        names = [c.strip() for c in (cells.split(",") if isinstance(cells, str) else cells) if c.strip()]
        known = {self.cell_name(c): c for c in self.train_cells}
        bad = [c for c in names if c not in known]
        if bad or not names:
            raise ValueError(f"cells must be in-distribution cells of the task ({', '.join(known)}), "
                             f"'auto' or 'all'; got {cells!r}")
        return tuple(known[c] for c in names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a task config is a mapping of its settings, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown task settings {unknown}")
        return cls(**d)


def _cells(name: str, cells) -> tuple[Cell, ...]:
    try:
        out = tuple(tuple(c) for c in cells)
    except TypeError:
        out = ((),)
    if not all(len(c) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in c) for c in out):
        raise ValueError(f"{name} must be (digits_a, digits_b) pairs of integers, got {cells!r}")
    return out


# ---------------------------------------------------------------- encode / decode

def encode(text: str) -> list[int]:
    """Tokens of a space-separated string of vocabulary items (``"<bos> 1 2 * 3 ="``)."""
    try:
        return [TOKEN_ID[t] for t in text.split()]
    except KeyError as e:
        raise ValueError(f"unknown token {e.args[0]!r}; the vocabulary is {' '.join(VOCAB)}") from None


def decode(tokens) -> str:
    """Inverse of :func:`encode`."""
    ids = tokens.tolist() if isinstance(tokens, Tensor | np.ndarray) else list(tokens)
    return " ".join(VOCAB[i] for i in ids)


# ---------------------------------------------------------------- questions

def _digits(n: Int[Tensor, " n"], width: int) -> Int[Tensor, "n width"]:
    """Most-significant-first decimal digits, zero-padded."""
    powers = 10 ** torch.arange(width - 1, -1, -1)
    return (n[:, None] // powers) % 10


def check_operands(a: Tensor, b: Tensor, task: TaskConfig) -> None:
    """``ValueError`` unless ``a`` and ``b`` are integer tensors of equal length whose values fit
    the task's ``width`` digits."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, Tensor) or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"operands {name} must be an integer tensor, got "
                             f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.ndim != 1:
            raise ValueError(f"operands {name} must be one-dimensional, got shape {tuple(x.shape)}")
        if len(x) and (x.min() < 0 or x.max() >= 10**task.width):
            raise ValueError(f"operands {name} must be in [0, {10**task.width - 1}] (width {task.width} digits), "
                             f"got values in [{int(x.min())}, {int(x.max())}]")
    if a.shape != b.shape:
        raise ValueError(f"operands a and b differ in length: {len(a)} and {len(b)}")


def prompt_tokens(a: Int[Tensor, " n"], b: Int[Tensor, " n"], task: TaskConfig) -> Int[Tensor, "n p"]:
    check_operands(a, b, task)
    n = a.shape[0]

    def col(tok):
        return torch.full((n, 1), tok, dtype=torch.long)
    return torch.cat([col(BOS), _digits(a, task.width), col(MUL), _digits(b, task.width), col(EQ)], 1)


def answer_tokens(c: Int[Tensor, " n"], task: TaskConfig) -> Int[Tensor, "n answer"]:
    digits = _digits(c, task.answer_len)
    return digits.flip(1) if task.answer_order == "reversed" else digits


def parse_candidate(cand: Int[Tensor, "n answer"], task: TaskConfig) -> Int[Tensor, " n"]:
    """Integer value of each candidate; -1 where it holds a non-digit token."""
    digits = cand.flip(1) if task.answer_order == "reversed" else cand
    valid = (digits <= 9).all(1)
    powers = 10 ** torch.arange(task.answer_len - 1, -1, -1)
    value = (digits.clamp(max=9) * powers).sum(1)
    return torch.where(valid, value, torch.full_like(value, -1))


def check(a: Int[Tensor, " n"], b: Int[Tensor, " n"], cand: Int[Tensor, "n answer"], task: TaskConfig
          ) -> Bool[Tensor, " n"]:
    """Exact checker: is the candidate the product a*b?"""
    return parse_candidate(cand, task) == a * b


def corrupt_digit(values: Int[Tensor, " n"], task: TaskConfig, rng: np.random.Generator) -> Int[Tensor, " n"]:
    """Change one random digit among the value's significant ones (never a no-op)."""
    out = values.clone()
    for i, v in enumerate(values.tolist()):
        digits = max(1, len(str(v)))
        place = int(rng.integers(0, digits))
        d = (v // 10**place) % 10
        new = int(rng.choice([x for x in range(10) if x != d]))
        out[i] = v + (new - d) * 10**place
    return out


def _in_test_split(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    keys = [hashlib.blake2b(f"{x}*{y}".encode(), digest_size=4).digest() for x, y in zip(a, b)]
    u = np.array([int.from_bytes(k, "little") for k in keys]) / 2**32
    return u < fraction


@dataclass(frozen=True)
class Questions:
    """A batch of questions with their difficulty cell."""

    a: Int[Tensor, " n"]
    b: Int[Tensor, " n"]

    @property
    def cells(self) -> list[Cell]:
        return list(zip(num_digits(self.a).tolist(), num_digits(self.b).tolist()))

    def __len__(self) -> int:
        return self.a.shape[0]

    def __getitem__(self, idx) -> Questions:
        return Questions(self.a[idx], self.b[idx])

    def repeat_interleave(self, g: int) -> Questions:
        return Questions(self.a.repeat_interleave(g), self.b.repeat_interleave(g))


def num_digits(n: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    return torch.where(n > 0, torch.floor(torch.log10(n.clamp(min=1).double())).long() + 1, 1)


Split = Literal["train", "test", "ood"]


def sample_questions(task: TaskConfig, split: Split, n: int, seed: int,
                     cells: tuple[Cell, ...] | None = None) -> Questions:
    """``n`` questions spread evenly over the split's cells (``train``/``test``: ``train_cells``,
    ``ood``: ``ood_cells``), reproducible from ``seed``. Train and test never share a question."""
    if split not in ("train", "test", "ood"):
        raise ValueError(f"split must be 'train', 'test' or 'ood', got {split!r}")
    if n < 1:
        raise ValueError(f"asked for {n} questions; ask for at least 1")
    cells = cells or (task.ood_cells if split == "ood" else task.train_cells)
    if not cells:
        raise ValueError(f"the task has no cells for split {split!r}")
    rng = np.random.default_rng(seed)
    per_cell = np.full(len(cells), n // len(cells))
    per_cell[: n % len(cells)] += 1
    a_all, b_all = [], []
    for (da, db), k in zip(cells, per_cell):
        lo_a, hi_a = (1 if da == 1 else 10 ** (da - 1)), 10**da
        lo_b, hi_b = (1 if db == 1 else 10 ** (db - 1)), 10**db
        got_a, got_b = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        while len(got_a) < k:
            a = rng.integers(lo_a, hi_a, size=4 * k + 16)
            b = rng.integers(lo_b, hi_b, size=4 * k + 16)
            if split != "ood":
                keep = _in_test_split(a, b, task.test_fraction) == (split == "test")
                a, b = a[keep], b[keep]
            got_a, got_b = np.concatenate([got_a, a]), np.concatenate([got_b, b])
        a_all.append(got_a[:k])
        b_all.append(got_b[:k])
    return Questions(torch.from_numpy(np.concatenate(a_all)), torch.from_numpy(np.concatenate(b_all)))


# ---------------------------------------------------------------- trajectories and roles

def token_roles(tokens: Int[Tensor, "batch pos"], task: TaskConfig) -> Int[Tensor, "batch pos"]:
    """Role of every token: PROMPT, SAMPLE, DECISION, END or PADDING.

    The format fixes it: the first ``prompt_len`` tokens are the prompt; after it, each attempt is
    ``answer_len`` sample tokens and one decision token. EOS and PAD tokens outside the prompt are
    END and PADDING wherever they stand (a model that writes them mid-candidate is still sampling,
    but its episode is over, see :mod:`tsds_interp.rollout`).
    """
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    offset = pos - task.prompt_len
    in_attempt = offset.remainder(task.attempt_len)
    role = torch.where(in_attempt == task.answer_len, DECISION, SAMPLE)
    role = torch.where(offset < 0, PROMPT, role).expand_as(tokens).clone()
    after_prompt = offset >= 0
    role[(tokens == EOS) & after_prompt] = END
    role[(tokens == PAD) & after_prompt] = PADDING
    # Everything after the first EOS/PAD is over.
    done = torch.cumsum((role == END) | (role == PADDING), 1) > 0
    role[done & (role != END)] = PADDING
    return role


def role_mask(roles: Int[Tensor, "batch pos"], role: int) -> Bool[Tensor, "batch pos"]:
    return roles == role


def build_trajectories(a: Int[Tensor, " n"], b: Int[Tensor, " n"],
                       candidates: list[Int[Tensor, " n"]], decisions: list[Int[Tensor, " n"]],
                       task: TaskConfig) -> Int[Tensor, "n pos"]:
    """Tokens of trajectories from integer candidates and decision tokens, one entry per attempt.

    Rows whose decision in an attempt is ACCEPT end there (EOS then PAD); the caller makes the
    last attempt's decision whatever it likes. Every row is padded to ``task.max_len``.
    """
    n = a.shape[0]
    out = torch.full((n, task.max_len), PAD, dtype=torch.long)
    out[:, : task.prompt_len] = prompt_tokens(a, b, task)
    alive = torch.ones(n, dtype=torch.bool)
    pos = task.prompt_len
    for cand, dec in zip(candidates, decisions):
        out[alive, pos : pos + task.answer_len] = answer_tokens(cand, task)[alive]
        out[alive, pos + task.answer_len] = dec[alive]
        pos += task.attempt_len
        alive = alive & (dec == REJECT)
    end = (out != PAD).sum(1)
    out[torch.arange(n), end.clamp(max=task.max_len - 1)] = EOS
    return out


def rejected_candidate_tokens(tokens: Int[Tensor, "batch pos"], task: TaskConfig,
                              roles: Int[Tensor, "batch pos"] | None = None) -> Bool[Tensor, "batch pos"]:
    """Sample tokens of candidates that are followed by a REJECT decision (what an SFT recipe that
    trains the decision but not the rejected answer leaves out of the loss); ``roles`` are
    :func:`token_roles` of ``tokens`` when the caller has them."""
    roles = token_roles(tokens, task) if roles is None else roles
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for start in range(task.prompt_len, tokens.shape[1] - task.answer_len, task.attempt_len):
        cand, dec = slice(start, start + task.answer_len), start + task.answer_len
        rejected = (tokens[:, dec] == REJECT) & (roles[:, dec] == DECISION)
        out[:, cand] = rejected[:, None] & (roles[:, cand] == SAMPLE)
    return out


# ---------------------------------------------------------------- step format
#
# Multiplication as steps over reduced states (Yu et al. 2025). The state ``x * y + r`` is written
# ``BOS x * y = r`` and a step ``u y' p r'``, every number least-significant digit first and
# zero-padded (x, y, y': ``width`` digits; r, p, r': ``2 * width``). A step takes the lowest
# nonzero digit u of y (at place k), zeroes it (y' = y - u 10^k), writes the shifted partial
# product p = u x 10^k and the new running sum r' = r + p. The next call's state is
# ``x * y' = r'``; once y' is 0 the answer is r'. Example, width 2, 12 * 34 + 0:
#
#   prompt  <bos> 2 1 * 4 3 = 0 0 0 0      (x = 12, y = 34, r = 0)
#   step    4 0 3 8 4 0 0 8 4 0 0          (u = 4, y' = 30, p = 48, r' = 48)
#   then    <accept> <eos>
#   next    <bos> 2 1 * 0 3 = 8 4 0 0  ->  3 0 0 0 6 3 0 8 0 4 0  (u = 3, y' = 0, p = 360, r' = 408)

def lsb_digits(n: Int[Tensor, " n"], k: int) -> Int[Tensor, "n k"]:
    """Least-significant-first decimal digits of ``n``, zero-padded to ``k``."""
    return (n[:, None] // 10 ** torch.arange(k)) % 10


def lsb_value(digits: Int[Tensor, "n k"]) -> Int[Tensor, " n"]:
    """Inverse of :func:`lsb_digits`; -1 where a token is not a digit."""
    value = (digits.clamp(max=9) * 10 ** torch.arange(digits.shape[1])).sum(1)
    return torch.where((digits <= 9).all(1), value, torch.full_like(value, -1))


@dataclass(frozen=True)
class States:
    """Reduced states ``x * y + r`` of the step format (one per row)."""

    x: Int[Tensor, " n"]
    y: Int[Tensor, " n"]
    r: Int[Tensor, " n"]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, idx) -> States:
        return States(self.x[idx], self.y[idx], self.r[idx])

    @staticmethod
    def cat(parts: list[States]) -> States:
        return States(*(torch.cat([getattr(p, k) for p in parts]) for k in ("x", "y", "r")))


def _check_steps_task(task: TaskConfig) -> None:
    if not task.steps:
        raise ValueError("this function belongs to the step format; build the task with task_format='steps'")


def state_tokens(s: States, task: TaskConfig) -> Int[Tensor, "n prompt"]:
    """``BOS x * y = r`` (least-significant digits first)."""
    _check_steps_task(task)
    W, n = task.width, len(s)
    if len(s) and (s.x.max() >= 10**W or s.y.max() >= 10**W or s.r.max() >= 10 ** (2 * W)):
        raise ValueError(f"a state does not fit width {task.width}: x, y need at most {W} digits, r {2 * W}")
    def col(tok):
        return torch.full((n, 1), tok, dtype=torch.long)
    return torch.cat([col(BOS), lsb_digits(s.x, W), col(MUL), lsb_digits(s.y, W), col(EQ),
                      lsb_digits(s.r, 2 * W)], 1)


def parse_states(prompt: Int[Tensor, "n prompt"], task: TaskConfig) -> States:
    """Inverse of :func:`state_tokens`."""
    W = task.width
    return States(lsb_value(prompt[:, 1 : 1 + W]), lsb_value(prompt[:, 2 + W : 2 + 2 * W]),
                  lsb_value(prompt[:, 3 + 2 * W : 3 + 4 * W]))


def true_step_tokens(s: States, task: TaskConfig) -> Int[Tensor, "n step"]:
    """The correct step ``u y' p r'`` from each state (y must be nonzero)."""
    _check_steps_task(task)
    W = task.width
    if len(s) and (s.y <= 0).any():
        raise ValueError("a state with y = 0 is solved; it has no step")
    digits = lsb_digits(s.y, W)
    place = (digits > 0).float().argmax(1)
    u = digits.gather(1, place[:, None]).squeeze(1)
    p = u * s.x * 10**place
    y_next = s.y - u * 10**place
    return torch.cat([u[:, None], lsb_digits(y_next, W), lsb_digits(p, 2 * W), lsb_digits(s.r + p, 2 * W)], 1)


def step_fields(step: Int[Tensor, "n step"], task: TaskConfig) -> dict[str, Int[Tensor, " n"]]:
    """Values of a step's fields ``u``, ``y`` (next y), ``p`` and ``r`` (next r); -1 where malformed."""
    W = task.width
    return {"u": lsb_value(step[:, :1]), "y": lsb_value(step[:, 1 : 1 + W]),
            "p": lsb_value(step[:, 1 + W : 1 + 3 * W]), "r": lsb_value(step[:, 1 + 3 * W : 1 + 5 * W])}


def check_steps(s: States, step: Int[Tensor, "n step"], task: TaskConfig) -> Bool[Tensor, " n"]:
    """Exact checker of the step format: is each step the correct step from its state?"""
    return (step == true_step_tokens(s, task)).all(1)


def next_states(s: States, step: Int[Tensor, "n step"], task: TaskConfig) -> States:
    """The state a taken step leads to (x kept; y and r as the step wrote them, -1 if malformed)."""
    f = step_fields(step, task)
    return States(s.x, f["y"], f["r"])


def n_calls(b: Int[Tensor, " n"], task: TaskConfig) -> Int[Tensor, " n"]:
    """Calls of a correct episode: the nonzero digits of b."""
    return (lsb_digits(b, task.width) > 0).sum(1)


def solution_states(a: Int[Tensor, " n"], b: Int[Tensor, " n"], task: TaskConfig, call: Int[Tensor, " n"]
                    ) -> States:
    """The state before call ``call`` (0-based) of the correct episode for ``a * b``."""
    _check_steps_task(task)
    if len(a) and ((call < 0) | (call >= n_calls(b, task))).any():
        raise ValueError("call index past the end of the episode")
    digits = lsb_digits(b, task.width)
    nz_before = (digits > 0).long().cumsum(1) - (digits > 0).long()  # nonzero digits below each place
    done = (digits > 0) & (nz_before < call[:, None])  # the lowest `call` nonzero digits are processed
    powers = 10 ** torch.arange(task.width)
    processed = (digits * done * powers).sum(1)
    return States(a.clone(), b - processed, a * processed)


def random_states(task: TaskConfig, split: str, n: int, seed: int, cells=None) -> States:
    """One state per question of ``split``: the state before a uniformly drawn call of its correct
    episode (so every call index of every cell is trained on)."""
    return question_states(sample_questions(task, split, n, seed, cells), task, seed + 1)


def question_states(q: Questions, task: TaskConfig, seed: int) -> States:
    """For each question, the state before a call of its correct episode drawn uniformly from ``seed``."""
    u = torch.rand(len(q), generator=torch.Generator().manual_seed(seed))
    return solution_states(q.a, q.b, task, (u * n_calls(q.b, task)).long())


def corrupt_step_tokens(step: Int[Tensor, "n step"], task: TaskConfig, rng: np.random.Generator
                        ) -> Int[Tensor, "n step"]:
    """Each step with one digit changed (never a no-op): in the partial product or the new sum
    (0.4 each; a place among the value's digits and one above) or in u or y' (0.1 each)."""
    W = task.width
    out = step.clone()
    f = step_fields(step, task)
    for i in range(len(step)):
        field = rng.choice(4, p=[0.1, 0.1, 0.4, 0.4])
        if field == 0:
            pos = 0
        elif field == 1:
            pos = 1 + int(rng.integers(0, W))
        else:
            start, value = (1 + W, int(f["p"][i])) if field == 2 else (1 + 3 * W, int(f["r"][i]))
            pos = start + int(rng.integers(0, min(2 * W, len(str(max(value, 0))) + 1)))
        d = int(out[i, pos])
        out[i, pos] = int(rng.choice([x for x in range(10) if x != d]))
    return out
