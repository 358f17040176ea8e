"""Contrast pairs, exact (batched) activation patching and attribution patching.

All functions take any TransformerLens hooked model (``run_with_cache``, ``run_with_hooks``,
``start_at_layer``, ``hooks``) and a metric ``logits[batch, pos, vocab] -> scalar`` (the mean over
the batch of a per-pair quantity), exactly as ``transformer_lens.patching`` does.

Grids (``GRIDS``): ``resid_pre``, ``attn_out``, ``mlp_out`` per layer x position; ``head`` (each
head's ``hook_z``, all positions) per layer x head; ``head_pos`` per layer x position x head.

Exact patching runs every cell of a layer as one batch of variants (stacked along the batch axis,
chunked to ``memory_mb``) and starts each of those runs at the patched layer from the base run's
cached residual stream, which the patch cannot change. ``denoise`` patches the clean run's
activation into the corrupted run; ``noise`` the corrupted one into the clean run.

Attribution patching estimates every cell at once as ``(source - base activation) . d metric /
d activation`` with the gradient from backward hooks on the base run (with ``ig_steps > 1``, the
gradient is averaged along the straight line from base to source, one layer at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.forward import OwnWeights, use_own_weights
from tsds_interp.metrics import decision_scores, score_candidates
from tsds_interp.rollout import rollout, sample_steps
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

Metric = Callable[[Tensor], Tensor]
Direction = Literal["denoise", "noise"]
GRIDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "head": ("attn.hook_z", ("layer", "head")),
    "head_pos": ("attn.hook_z", ("layer", "pos", "head")),
}


def hook_name(grid: str, layer: int) -> str:
    if grid not in GRIDS:
        raise ValueError(f"unknown patching grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return f"blocks.{layer}.{GRIDS[grid][0]}"


def check_hook_names(model, names: list[str]) -> None:
    """A clear error for hook names the model does not have."""
    known = set(model.hook_dict)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown hook name {bad[0]!r}; the model has e.g. "
                         f"{', '.join(sorted(known)[:4])}, ... (see model.hook_dict)")


# ---------------------------------------------------------------- contrast pairs

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
    r = rollout(model, questions.repeat_interleave(samples), task=task, budget=1, temperature=temperature,
                seed=seed)
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
        rows.append(dict(cell=f"{cell[0]}x{cell[1]}", gap=gaps.mean() if len(gaps) else np.nan, lo=lo, hi=hi,
                         questions_with_wrong=len(gaps), deciding=bool(len(gaps) >= 5 and lo > 0)))
    return pd.DataFrame(rows)


def _within_gaps(model, q: Questions, sampled: Int[Tensor, "n samples"], task: TaskConfig) -> np.ndarray:
    """Per question with a wrong sample: decision logit gap of the truth minus the mean over its wrong samples."""
    v = score_candidates(q, sampled[:, 0], sampled, task, lambda t: decision_scores(model, t), attempts=1)
    return mean_gap(v.attempts[0]["truth"], v.attempts[0]["wrong"])


def parse_cells(cells: str | tuple[str, ...] | list[str], task: TaskConfig) -> tuple[Cell, ...]:
    """``"1x2,2x1"`` or ``["1x2", "2x1"]`` -> in-distribution cells, with a clear error."""
    names = [c.strip() for c in (cells.split(",") if isinstance(cells, str) else cells) if c.strip()]
    known = {f"{a}x{b}": (a, b) for a, b in task.train_cells}
    bad = [c for c in names if c not in known]
    if bad or not names:
        raise ValueError(f"cells must be in-distribution cells of the task ({', '.join(known)}), "
                         f"'auto' or 'all'; got {cells!r}")
    return tuple(known[c] for c in names)


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
        if not fallback:
            raise ValueError(f"the model made only {k_model} wrong samples in cells {_names(chosen)}; ask for "
                             "fewer pairs, other cells, a higher temperature, or allow the corruption fallback")
        q = sample_questions(task, "test", n - k_model, seed=seed + 7, cells=chosen)
        a, b = torch.cat([a, q.a]), torch.cat([b, q.b])
        w = torch.cat([w, corrupt_digit(q.a * q.b, task, rng)])
    prompt = prompt_tokens(a, b, task)
    truth = answer_tokens(a * b, task)
    origin = ["model"] * k_model + ["corruption"] * (n - k_model)
    return Pairs("decision", torch.cat([prompt, truth], 1), torch.cat([prompt, answer_tokens(w, task)], 1),
                 truth, origin, task.prompt_len, cells=_names(chosen), cell_rule=rule)


def _names(cells: tuple[Cell, ...]) -> list[str]:
    return [f"{a}x{b}" for a, b in cells]


def _choose_cells(model, task: TaskConfig, cells, samples: int, temperature: float, seed: int
                  ) -> tuple[str, tuple[Cell, ...]]:
    if isinstance(cells, str) and cells == "all":
        return "all", task.train_cells
    if not (isinstance(cells, str) and cells == "auto"):
        return "given", parse_cells(cells, task)
    screen = screen_cells(model, task, samples=samples, temperature=temperature, seed=seed)
    deciding = screen[screen.deciding].cell.tolist()
    if deciding:
        return "auto: screened gap > 0", parse_cells(deciding, task)
    with_wrong = screen[screen.questions_with_wrong > 0].cell.tolist()
    return "auto: no cell decides; cells with wrong samples", parse_cells(with_wrong or _names(task.train_cells),
                                                                          task)


def sampling_pairs(task: TaskConfig, n: int, seed: int = 0, cells: str | tuple[str, ...] = "all") -> Pairs:
    """Two questions differing in one digit of ``a``; the metric is the log-prob of the clean
    question's answer, teacher-forced after either prompt. ``cells``: ``"all"`` or a list."""
    if n < 1:
        raise ValueError(f"asked for {n} pairs; ask for at least 1")
    chosen = task.train_cells if cells in ("all", "auto") else parse_cells(cells, task)
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
    return Pairs("sampling", clean, corrupted, ans, ["corruption"] * n, task.prompt_len, cells=_names(chosen),
                 cell_rule="all" if chosen == task.train_cells else "given")


def _step_decision_pairs(model, task: TaskConfig, n: int, seed: int, cells, samples: int, temperature: float,
                         fallback: bool, max_rounds: int) -> Pairs:
    """Step format: the same state (one drawn from a held-out question's correct episode), the true
    step (clean) vs the model's own wrong step (corrupted). ``"auto"`` means every in-distribution cell:
    in this format the decision is read per state, and every cell has states."""
    rule, chosen = ("all", task.train_cells) if cells in ("all", "auto") else ("given", parse_cells(cells, task))
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
        if not fallback:
            raise ValueError(f"the model made only {k_model} wrong steps in cells {_names(chosen)}; ask for "
                             "fewer pairs, other cells, a higher temperature, or allow the corruption fallback")
        extra = random_states(task, "test", n - k_model, seed=seed + 7, cells=chosen)
        s = States.cat([s, extra])
        w = torch.cat([w, corrupt_step_tokens(true_step_tokens(extra, task), task, np.random.default_rng(seed))])
    prompt, truth = state_tokens(s, task), true_step_tokens(s, task)
    origin = ["model"] * k_model + ["corruption"] * (n - k_model)
    return Pairs("decision", torch.cat([prompt, truth], 1), torch.cat([prompt, w], 1), truth, origin, P,
                 cells=_names(chosen), cell_rule=rule)


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
    return Pairs("sampling", clean, corrupted, step, ["corruption"] * n, task.prompt_len, cells=_names(chosen),
                 cell_rule="all" if chosen == task.train_cells else "given")


# ---------------------------------------------------------------- exact patching

def _cells(axes: tuple[str, ...], n_pos: int, n_heads: int) -> list[tuple[int, ...]]:
    sizes = {"pos": n_pos, "head": n_heads}
    rest = [sizes[a] for a in axes[1:]]
    return [tuple(ix) for ix in np.ndindex(*rest)]


def _patch_variants(act: Tensor, src: Tensor, cells: Tensor, axes: tuple[str, ...], n_var: int) -> Tensor:
    """Write ``src`` into variant i of ``act`` (variants stacked along batch) at cell ``cells[i]``."""
    act = act.clone().view(n_var, -1, *act.shape[1:])
    v = torch.arange(n_var)
    if axes[1:] == ("pos",):
        act[v, :, cells[:, 0]] = src[:, cells[:, 0]].transpose(0, 1)
    elif axes[1:] == ("head",):
        act[v, :, :, cells[:, 0]] = src[:, :, cells[:, 0]].permute(2, 0, 1, 3)
    else:
        act[v, :, cells[:, 0], cells[:, 1]] = src[:, cells[:, 0], cells[:, 1]].transpose(0, 1)
    return act.view(-1, *act.shape[2:])


def _bytes_per_variant(cfg, B: int, T: int) -> int:
    """Activation memory of one patched run of ``B`` sequences of length ``T`` (an estimate)."""
    return 4 * B * T * (cfg.d_model * 12 + cfg.n_heads * T + cfg.d_vocab)


def check_contrast(clean: Tensor, corrupted: Tensor, direction: str) -> None:
    """``ValueError`` unless the two token batches have one shape and ``direction`` is known."""
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} tokens "
                         "must have the same shape")
    if clean.ndim != 2 or clean.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(clean.shape)}")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")


@torch.no_grad()
def activation_patch(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                     metric: Metric, grid: str = "head", direction: Direction = "denoise",
                     memory_mb: float = 256.0) -> Tensor:
    """Metric after patching each cell of ``grid``; shaped like ``transformer_lens.patching``'s
    result ([layer, pos], [layer, head] or [layer, pos, head])."""
    check_contrast(clean, corrupted, direction)
    checks.number("memory_mb", memory_mb, lo=0, hi=1e7, lo_open=True)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    if grid == "head_pos" and use_own_weights(model, "head_pos patching"):
        return _PrefixReuse(model).head_pos(base, source, metric, memory_mb)
    cfg = model.cfg
    names = [hook_name(grid, layer) for layer in range(cfg.n_layers)]
    axes = GRIDS[grid][1]
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)]
    check_hook_names(model, names + resid)
    _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in resid)
    B, T = base.shape
    # With causal attention, before the first position where any pair differs both runs are
    # identical: patching there is a no-op, so those cells take the base run's metric unrun.
    differs = (clean != corrupted).any(0).nonzero()
    causal = getattr(cfg, "attention_dir", "causal") == "causal"
    first_diff = T if not len(differs) else (int(differs[0]) if causal else 0)
    all_cells = _cells(axes, T, cfg.n_heads)
    live = [i for i, c in enumerate(all_cells) if "pos" not in axes or c[0] >= first_diff]
    cells = [all_cells[i] for i in live]
    chunk = max(1, int(memory_mb * 2**20 // _bytes_per_variant(cfg, B, T)))
    out = torch.empty(cfg.n_layers, len(cells))
    for layer in range(cfg.n_layers if cells else 0):
        src = src_cache[names[layer]]
        for start in range(0, len(cells), chunk):
            cell_ix = torch.tensor(cells[start : start + chunk])
            n_var = len(cell_ix)
            x = base_cache[resid[layer]].repeat(n_var, 1, 1)
            if grid == "resid_pre":
                logits = model(_patch_variants(x, src, cell_ix, axes, n_var), start_at_layer=layer)
            else:
                hook = lambda act, hook, c=cell_ix, s=src, n=n_var: _patch_variants(act, s, c, axes, n)
                logits = model.run_with_hooks(x, start_at_layer=layer, fwd_hooks=[(names[layer], hook)])
            logits = logits.view(n_var, B, *logits.shape[1:])
            out[layer, start : start + n_var] = torch.stack([metric(lg) for lg in logits]).float()
    full = torch.full((cfg.n_layers, len(all_cells)), float(metric(model(base))))
    full[:, live] = out[:, : len(live)]
    shape = [cfg.n_layers] + [T if a == "pos" else cfg.n_heads for a in axes[1:]]
    return full.view(shape)


class _PrefixReuse:
    """Exact head x position patching that recomputes only what a patch can change.

    Patching head h's ``hook_z`` at layer l and position p leaves every layer below l and, with
    causal attention, every position before p as in the base run. So each patched variant starts
    from the base run's residual stream at layer l, recomputes positions p.. only, and attends to
    the base run's cached keys and values for positions before p. It runs the model's own weights
    (:mod:`tsds_interp.forward`, which refuses models it does not reproduce exactly); results equal
    the hooked model's to float rounding (tested against ``transformer_lens.patching``).
    """

    def __init__(self, model):
        self.own = OwnWeights(model)
        self.cfg = model.cfg

    def _run(self, tokens: Tensor) -> tuple[list, list, list, list, Tensor]:
        x = self.own.embed(tokens)
        resid, ks, vs, zs = [], [], [], []
        for layer in range(self.cfg.n_layers):
            resid.append(x)
            x, k, v, z = self.own.block(x, layer)
            ks.append(k), vs.append(v), zs.append(z)
        return resid, ks, vs, zs, self.own.unembed(x)

    def _heads_per_batch(self, B: int, T: int, memory_mb: float) -> int:
        return max(1, min(self.cfg.n_heads, int(memory_mb * 2**20 // _bytes_per_variant(self.cfg, B, T))))

    @torch.no_grad()
    def head_pos(self, base: Tensor, source: Tensor, metric: Metric, memory_mb: float) -> Tensor:
        n_heads, n_layers = self.cfg.n_heads, self.cfg.n_layers
        self.resid, self.ks, self.vs, _, self.base_logits = self._run(base)
        self.src_z = self._run(source)[3]
        B, T = base.shape
        out = torch.full((n_layers, T, n_heads), float(metric(self.base_logits)))
        differs = (base != source).any(0).nonzero()
        first = int(differs[0]) if len(differs) else T
        chunk = self._heads_per_batch(B, T, memory_mb)
        for layer in range(n_layers):
            for pos in range(first, T):
                for start in range(0, n_heads, chunk):
                    heads = torch.arange(start, min(start + chunk, n_heads))
                    out[layer, pos, heads] = self._variants(layer, pos, heads, metric)
        return out

    def _variants(self, layer: int, pos: int, heads: Tensor, metric: Metric) -> Tensor:
        """The metric with each of ``heads`` at (``layer``, ``pos``) taking the source's output."""
        n, (B, T) = len(heads), self.base_logits.shape[:2]
        rep = lambda t: t.repeat(n, *([1] * (t.dim() - 1)))
        rows = torch.arange(n)

        def patch(z):  # variant i takes the source's head heads[i] at pos
            z = z.clone().view(n, B, *z.shape[1:])
            z[rows, :, heads, 0] = self.src_z[layer][:, heads, pos].permute(1, 0, 2)
            return z.view(-1, *z.shape[2:])

        def prefix(layer):  # the base run's keys and values before pos
            k_prefix, v_prefix = rep(self.ks[layer][:, :, :pos]), rep(self.vs[layer][:, :, :pos])
            return lambda k, v: (torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2))
        x = self.own.block(rep(self.resid[layer][:, pos:]), layer, prefix(layer), patch)[0]
        for later in range(layer + 1, self.cfg.n_layers):
            x = self.own.block(x, later, prefix(later))[0]
        logits = torch.cat([rep(self.base_logits[:, :pos]), self.own.unembed(x)], 1).view(n, B, T, -1)
        return torch.stack([metric(lg) for lg in logits]).float()


# ---------------------------------------------------------------- attribution patching

def _reduce_cells(x: Tensor, grid: str) -> Tensor:
    """(delta * grad) summed over features (and positions for ``head``), batch summed."""
    if grid == "head":
        return x.sum((0, 1, 3))
    if grid == "head_pos":
        return x.sum((0, 3))
    return x.sum((0, 2))


def attribution_patch(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                      metric: Metric, grid: str = "head", direction: Direction = "denoise",
                      ig_steps: int = 1) -> Tensor:
    """First-order estimate of :func:`activation_patch` minus the base run's metric, same shape."""
    check_contrast(clean, corrupted, direction)
    checks.number("ig_steps", ig_steps, lo=1, hi=1000, integer=True)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    names = [hook_name(grid, layer) for layer in range(model.cfg.n_layers)]
    check_hook_names(model, names)
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in names)
    grads = {n: torch.zeros_like(base_cache[n]) for n in names}
    if ig_steps == 1:
        _accumulate_grads(model, base, metric, {n: None for n in names}, grads, 1.0)
    else:
        for n in names:
            for k in range(ig_steps):
                alpha = (k + 0.5) / ig_steps
                point = base_cache[n] + alpha * (src_cache[n] - base_cache[n])
                _accumulate_grads(model, base, metric, {n: point}, grads, 1.0 / ig_steps)
    per_layer = [_reduce_cells((src_cache[n] - base_cache[n]) * grads[n], grid) for n in names]
    return torch.stack(per_layer)


def _accumulate_grads(model, tokens, metric, replace: dict[str, Tensor | None], grads: dict, scale):
    """One forward/backward with backward hooks on ``replace``'s names; a non-None value replaces
    that activation. Adds ``scale * d metric / d activation`` into ``grads``; leaves no hook and
    no parameter gradient behind."""
    saved = [(p, p.grad) for p in model.parameters()]

    def fwd(act, hook, value=None):
        return act if value is None else act + (value - act).detach()  # value, gradient of act

    def bwd(grad, hook, name=None):
        grads[name] += scale * grad.detach()

    fwd_hooks = [(n, lambda a, hook, v=v: fwd(a, hook, v)) for n, v in replace.items() if v is not None]
    bwd_hooks = [(n, lambda g, hook, n=n: bwd(g, hook, n)) for n in replace]
    try:  # model.hooks removes exactly the hooks it added, also when the metric raises
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            metric(model(tokens)).backward()
    finally:
        for p, g in saved:
            p.grad = g


# ---------------------------------------------------------------- tidy results

def normalized(values: Tensor, clean_value: float, corrupted_value: float, direction: Direction,
               attribution: bool = False) -> Tensor:
    """0 = corrupted run, 1 = clean run. Attribution scores are changes from the base run."""
    base = corrupted_value if direction == "denoise" else clean_value
    v = values + base if attribution else values
    return (v - corrupted_value) / (clean_value - corrupted_value)


def to_frame(values: Tensor, grid: str, **labels) -> pd.DataFrame:
    axes = GRIDS[grid][1]
    idx = pd.MultiIndex.from_tuples(list(np.ndindex(*values.shape)), names=list(axes))
    df = pd.DataFrame({"value": values.flatten().numpy()}, index=idx).reset_index()
    df.insert(0, "grid", grid)
    for k, v in reversed(labels.items()):
        df.insert(0, k, v)
    return df
