"""Your own model and reflective traces: role-split gradient attribution, DS counts and patching.

A trace is a row of token ids with a role per token: ``prompt``, ``sample`` (a candidate answer),
``decision`` (the token that accepts or rejects it), or ``end`` / ``pad`` (no loss). Nothing here
assumes this project's task or vocabulary; any TransformerLens model works (a ``TransformerBridge``
booted natively, or from a HuggingFace folder with ``TransformerBridge.boot_transformers``).

- :func:`role_attribution`: every objective's gradient split exactly by role (the Gradient
  Attribution Property of :mod:`tsds_interp.attribution`), as the tidy table and its summary;
- :func:`ds_counts`: the DS decomposition ``p_s``, ``p_d|C = P(accept | correct)``, ``p_d|W =
  P(reject | wrong)`` with Wilson 95% intervals, from the decisions in the traces and your labels
  of which candidates are correct;
- :func:`patch`: exact activation patching or attribution patching of any contrast pairs under
  any metric, as a tidy table;
- :func:`generate`: continuations of your prompts, decoded with a key/value cache on the model's
  own weights where :mod:`tsds_interp.forward` reproduces the model (GPT-2, Llama, Qwen2, Mistral
  and native layouts), to make traces from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.forward import KVCache, use_own_weights
from tsds_interp.gradient_split import OBJECTIVES, Trajectories, attribute, summarize
from tsds_interp.patching import activation_patch, attribution_patch, check_grid, to_frame
from tsds_interp.rollout import UncachedStepper, sample_tokens
from tsds_interp.stats import wilson
from tsds_interp.task import DECISION, END, PADDING, PROMPT, ROLE_NAMES, SAMPLE

ROLE_OF = {name: i for i, name in enumerate(ROLE_NAMES)}


def role_ids(roles) -> Int[Tensor, "batch pos"]:
    """Roles as ids: a tensor of ids, or nested lists of ids or names (``"prompt"``, ``"sample"``,
    ``"decision"``, ``"end"``, ``"pad"``)."""
    if isinstance(roles, Tensor):
        if roles.dtype.is_floating_point or roles.dtype == torch.bool:
            raise ValueError(f"roles must be integer ids or names, got a {roles.dtype} tensor")
        out = roles.long()
    else:
        if isinstance(roles, str) or not all(isinstance(row, Sequence) and not isinstance(row, str) for row in roles):
            raise ValueError("roles must be rows, one role name or id per token")
        rows = [[_role_id(r) for r in row] for row in roles]
        if len({len(row) for row in rows}) > 1:
            raise ValueError("roles must be rows of equal length, one role name or id per token")
        out = torch.tensor(rows)
    if out.ndim != 2 or not ((out >= PROMPT) & (out <= PADDING)).all():
        raise ValueError(f"roles must be a [batch, pos] table of {', '.join(ROLE_NAMES)} (ids 0-4)")
    return out


def _role_id(r) -> int:
    if isinstance(r, str):
        if r not in ROLE_OF:
            raise ValueError(f"unknown role {r!r}; roles are {', '.join(ROLE_NAMES)}")
        return ROLE_OF[r]
    if isinstance(r, bool) or not isinstance(r, int | np.integer):
        raise ValueError(f"a role must be a name ({', '.join(ROLE_NAMES)}) or an id 0-4, got {r!r}")
    return int(r)


def traces(tokens, roles, reward=None, group: int = 1, source: str = "traces") -> Trajectories:
    """Checked :class:`~tsds_interp.attribution.Trajectories` from token ids and roles (``reward``
    per row, rows in groups of ``group`` of the same prompt: needed by the ``surrogate`` objective)."""
    tokens = checks.token_ids(tokens)
    roles = role_ids(roles)
    if tokens.shape != roles.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and roles {tuple(roles.shape)} must have the same shape")
    if not ((roles == SAMPLE) | (roles == DECISION)).any():
        raise ValueError("no sample or decision token in the traces: nothing carries a loss")
    if reward is not None:
        reward = torch.as_tensor(reward, dtype=torch.float32)
        if reward.shape != (len(tokens),):
            raise ValueError(f"reward must have one value per row ({len(tokens)}), got shape {tuple(reward.shape)}")
        if not torch.isfinite(reward).all():
            raise ValueError("reward must be finite in every row")
    checks.number("group", group, lo=1, hi=len(tokens), integer=True)
    if len(tokens) % group:
        raise ValueError(f"{len(tokens)} rows are not a whole number of groups of {group}")
    return Trajectories(tokens.long(), roles, reward, group, source)


def role_attribution(model, tokens, roles, objectives: Sequence[str] = ("sft_token_mean",), reward=None,
                     group: int = 1, ref=None, decision_share: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each objective's gradient on the traces, split by role: ``(table, summary)`` as
    :func:`tsds_interp.attribution.attribute` and :func:`~tsds_interp.attribution.summarize` give
    them (totals, parameter groups, activations; ratio, cosine, imbalance index)."""
    batch = traces(tokens, roles, reward, group)
    checks.token_ids(batch.tokens, model.cfg.d_vocab)
    objectives = (objectives,) if isinstance(objectives, str) else tuple(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise ValueError(f"unknown objective {bad[0]!r}; choose from {', '.join(OBJECTIVES)}")
    device = next(model.parameters()).device
    batch = Trajectories(batch.tokens.to(device), batch.roles.to(device), batch.reward, group, batch.source)
    kw = {"decision_share": decision_share}
    frames = [attribute(model, batch, o, ref=ref, **(kw if o.startswith("sft_") else {})) for o in objectives]
    table = pd.concat(frames, ignore_index=True)
    return table, summarize(table)


def attempts(tokens, roles) -> list[list[tuple[list[int], int]]]:
    """Per row, its attempts in order: (the candidate's token ids, the decision token id). A
    candidate is the run of sample tokens right before a decision token."""
    tokens, roles = checks.token_ids(tokens), role_ids(roles)
    if tokens.shape != roles.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and roles {tuple(roles.shape)} must have the same shape")
    out = []
    for row_tokens, row_roles in zip(tokens.tolist(), roles.tolist()):
        row, candidate = [], []
        for tok, role in zip(row_tokens, row_roles):
            if role == SAMPLE:
                candidate.append(tok)
            elif role == DECISION:
                row.append((candidate, tok))
                candidate = []
            elif role in (PROMPT, END, PADDING):
                candidate = []
        out.append(row)
    return out


def _is_bool(x) -> bool:
    return isinstance(x, bool | np.bool_) or (isinstance(x, Tensor) and x.dtype == torch.bool and x.numel() == 1)


def ds_counts(tokens, roles, accept: int, reject: int,
              correct: Sequence[Sequence[bool]] | Callable[[int, list[int]], bool]) -> pd.DataFrame:
    """The DS decomposition of the traces' attempts.

    ``accept`` / ``reject``: the decision token ids; ``correct``: per row, one bool per attempt, or
    ``correct(row, candidate_ids) -> bool``. Rows: ``p_s`` (correct candidates / attempts),
    ``p_s_first`` (first attempts only), ``p_d_given_c`` (accepts among correct candidates),
    ``p_d_given_w`` (rejects among wrong ones), ``other_decision`` (decision tokens that are neither);
    columns ``metric, value, lo, hi, k, n`` with Wilson 95% intervals.
    """
    for name, value in (("accept", accept), ("reject", reject)):
        checks.number(name, value, lo=0, integer=True)
    if accept == reject:
        raise ValueError(f"accept and reject must be different token ids, got {accept} for both")
    rows = attempts(tokens, roles)
    if not callable(correct) and len(correct) != len(rows):
        raise ValueError(f"correct has labels for {len(correct)} rows, the traces have {len(rows)}")
    k = dict.fromkeys(("p_s", "p_s_first", "p_d_given_c", "p_d_given_w", "other_decision"), 0)
    n = dict.fromkeys(k, 0)
    for i, row in enumerate(rows):
        labels = [correct(i, c) for c, _ in row] if callable(correct) else list(correct[i])
        if not all(_is_bool(x) for x in labels):
            raise ValueError(f"correctness labels must be True or False, row {i} has {labels!r}")
        labels = [bool(x) for x in labels]
        if len(labels) != len(row):
            raise ValueError(f"row {i} has {len(row)} attempts but {len(labels)} correctness labels")
        for j, ((_, decision), right) in enumerate(zip(row, labels)):
            k["p_s"] += bool(right)
            n["p_s"] += 1
            if j == 0:
                k["p_s_first"] += bool(right)
                n["p_s_first"] += 1
            key = "p_d_given_c" if right else "p_d_given_w"
            k[key] += decision == (accept if right else reject)
            n[key] += 1
            k["other_decision"] += decision not in (accept, reject)
            n["other_decision"] += 1
    if not n["p_s"]:
        raise ValueError("no attempt (sample tokens followed by a decision token) in the traces")
    table = pd.DataFrame({"metric": list(k), "k": list(k.values()), "n": list(n.values())})
    lo, hi = wilson(table.k.to_numpy(), table.n.to_numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        table["value"] = table.k / table.n.replace(0, np.nan)
    table["lo"], table["hi"] = lo, hi
    return table[["metric", "value", "lo", "hi", "k", "n"]]


def patch(model, clean, corrupted, metric: Callable[[Tensor], Tensor], grid: str = "head",
          method: str = "activation", direction: str = "denoise", **kw) -> pd.DataFrame:
    """Patch every cell of ``grid`` (:data:`tsds_interp.patching.GRIDS`) from the clean into the
    corrupted run (``denoise``) or back (``noise``). Tidy rows with ``effect``: the change of the
    metric from the unpatched base run, exact (``activation``) or first-order (``attribution``), the
    same column as in ``patch``'s ``patching.csv``; ``metric_after`` (activation only) is the metric
    with the cell patched, and ``base_metric`` the base run's."""
    check_grid(grid)
    clean, corrupted = checks.contrast(model, clean, corrupted, direction)
    if method not in ("activation", "attribution"):
        raise ValueError(f"method must be activation or attribution, got {method!r}")
    with torch.no_grad():
        base = float(checks.metric(metric)(model(corrupted if direction == "denoise" else clean)))
    if method == "activation":
        after = activation_patch(model, clean, corrupted, metric, grid, direction, **kw)
        df = to_frame(after - base, grid, method=method, direction=direction).rename(columns={"value": "effect"})
        df["metric_after"] = after.flatten().numpy()
    elif method == "attribution":
        effect = attribution_patch(model, clean, corrupted, metric, grid, direction, **kw)
        df = to_frame(effect, grid, method=method, direction=direction).rename(columns={"value": "effect"})
        df["metric_after"] = float("nan")
    else:
        raise ValueError(f"method must be activation or attribution, got {method!r}")
    df["base_metric"] = base
    return df


def prompt_ids(model, prompts) -> Int[Tensor, "batch pos"]:
    """Prompts as one ``[batch, pos]`` table of token ids: ids as given, or strings through the
    model's tokenizer (they must come out one length)."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], str)):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("the model has no tokenizer: pass prompts as token ids")
        rows = model.tokenizer([prompts] if isinstance(prompts, str) else list(prompts))["input_ids"]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"the prompts tokenize to different lengths ({sorted({len(r) for r in rows})}); "
                             f"generate from prompts of one length at a time")
        return torch.tensor(rows)
    tokens = torch.as_tensor(prompts)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"prompts must be strings or a non-empty [batch, pos] table of integer token ids, got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    vocab = model.cfg.d_vocab
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"prompt token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
    return tokens.long()


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 16, temperature: float = 1.0, seed: int = 0,
             stop_token: int | None = None, stop_at_eos: bool = True, cached: bool = True
             ) -> tuple[Int[Tensor, "batch total"], Float[Tensor, "batch new"]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens sampled at ``temperature`` (0:
    greedy). Returns the prompts with their continuations and each new token's log-probability at
    temperature 1. A row that writes ``stop_token`` (default: the tokenizer's end-of-sequence token,
    unless ``stop_at_eos=False``) is padded with it (log-probability 0) until the longest row ends.
    The same ``seed`` gives the same tokens cached or not (one uniform number per row and step, drawn up front);
    ``cached=False`` decodes through the hooked model without a cache (the reference)."""
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"max_new_tokens must be >= 1 and temperature >= 0, got {max_new_tokens} and {temperature}")
    tokens = prompt_ids(model, prompts).to(next(model.parameters()).device)
    if stop_token is None and stop_at_eos and getattr(model, "tokenizer", None) is not None:
        stop_token = model.tokenizer.eos_token_id
    n, length = tokens.shape
    decoder_class = KVCache if cached and use_own_weights(model, "generate") else UncachedStepper
    decoder = decoder_class(model, n, length + max_new_tokens)
    uniforms = torch.rand(n, max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    new, logprobs = [], []
    done = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    logits = decoder.prefill(tokens)
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature, uniforms[:, step].to(logits.device))
        logprob = logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
        if stop_token is not None:
            token = token.masked_fill(done, stop_token)
            logprob = logprob.masked_fill(done, 0.0)
            done |= token == stop_token
        new.append(token)
        logprobs.append(logprob)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return torch.cat([tokens, torch.stack(new, 1)], 1), torch.stack(logprobs, 1)
