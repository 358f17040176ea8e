"""Gradient Attribution Property: every objective's gradient split exactly by token role.

An objective is a sum of per-token terms (:mod:`tsds_interp.objectives`), so masking the terms by
role splits its gradient exactly: ``g = g_sample + g_decision (+ g_other)``, where ``g_other`` is
zero for every objective here because prompt, END and padding tokens carry no loss. For each role
this module measures, with ``n_r`` the number of tokens of role ``r`` in the batch:

- totals: ``|g_s|``, ``|g_d|`` (L2 norms over all parameters), ``ratio = |g_d| / |g_s|``,
  ``cosine = <g_s, g_d> / (|g_s| |g_d|)`` and per-token norms ``|g_r| / n_r``;
- **imbalance index** ``I = decision share of gradient mass / decision share of tokens`` with
  ``share_mass = |g_d| / (|g_s| + |g_d|)`` and ``share_tokens = n_d / (n_s + n_d)``. ``I = 1`` is
  pure length weighting (the decision gets gradient in proportion to its token count: the
  "unbalanced" case of the paper); an even split between the two functions (``|g_d| = |g_s|``,
  "balanced") gives ``I = 0.5 / share_tokens`` (3.5 for one decision per six answer digits);
- per parameter group: token and position embeddings, each layer's attention per head (that
  head's slices of W_Q, W_K, W_V, W_O and of b_Q, b_K, b_V), the layer's shared attention bias
  b_O, its layer norms, its MLP, the final layer norm and the unembedding;
- per activation, from backward hooks: the gradient reaching each head's ``hook_z`` and each
  layer's ``hook_mlp_out`` at each position class, where a position's class is the role of the
  token it predicts (``sample``, ``decision``, or ``context`` for the rest).

``python -m tsds_interp.attribution --checkpoint rl`` prints the role table of every objective on
the model's own rollouts and writes ``attribution.csv``, ``summary.csv`` and two figures.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.data import reflective_sft_data
from tsds_interp.model import (
    config_of,
)
from tsds_interp.objectives import (
    Terms,
    advantages,
    kl_terms,
    policy_gradient_terms,
    sft_terms,
    token_logprobs,
)
from tsds_interp.rollout import Rollouts, StepRollouts, rollout
from tsds_interp.task import DECISION, SAMPLE, TaskConfig, sample_questions, token_roles

OBJECTIVES = ("surrogate", "sft_token_mean", "sft_sequence_mean", "sft_role_balanced", "kl")
ROLES = {"sample": SAMPLE, "decision": DECISION}


@dataclass
class Trajectories:
    """Token sequences with their roles; ``reward`` (per episode, in groups of ``group`` episodes of
    the same question) is needed by the surrogate objective only. Rows are episodes unless
    ``episode`` says which episode each row belongs to (step format: one row per attempt)."""

    tokens: Int[Tensor, "batch pos"]
    roles: Int[Tensor, "batch pos"]
    reward: Float[Tensor, " episodes"] | None = None
    group: int = 1
    source: str = "rollouts"
    episode: Int[Tensor, " batch"] | None = None

    @staticmethod
    def from_rollouts(r: Rollouts | StepRollouts, group: int) -> Trajectories:
        episode = r.episode if isinstance(r, StepRollouts) else None
        return Trajectories(r.tokens, r.roles, r.reward, group, "rollouts", episode)

    @staticmethod
    def from_tokens(tokens: Int[Tensor, "batch pos"], task: TaskConfig, source: str = "sft_data") -> Trajectories:
        return Trajectories(tokens, token_roles(tokens, task), None, 1, source)


def objective_terms(model, batch: Trajectories, objective: str, ref=None, decision_share: float = 0.5,
                    kl_estimator: str = "k3", advantage: str = "grpo") -> Terms:
    """Per-token terms of ``objective`` on ``batch`` at the model's current weights.

    ``surrogate``: on-policy policy-gradient surrogate ``-A * pi/pi_old`` (token_sum), whose
    gradient is the REINFORCE/GRPO gradient; ``sft_<weighting>``: negative log-likelihood;
    ``kl``: the KL penalty to ``ref`` (coefficient 1, token_sum).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    logp, _ = token_logprobs(model, batch.tokens)
    if objective == "surrogate":
        if batch.reward is None:
            raise ValueError("the surrogate objective needs rewards: use Trajectories.from_rollouts")
        adv = advantages(batch.reward.to(logp.device), batch.group, advantage)
        if batch.episode is not None:  # every attempt carries its episode's advantage
            adv = adv[batch.episode.to(logp.device)]
        return policy_gradient_terms(logp, logp.detach(), batch.roles, adv)
    if objective == "kl":
        if ref is None:
            raise ValueError("the kl objective needs a reference model (ref=...)")
        with torch.no_grad():
            ref_logp, _ = token_logprobs(ref, batch.tokens)
        return kl_terms(logp, ref_logp, batch.roles, beta=1.0, estimator=kl_estimator)
    return sft_terms(logp, batch.roles, objective.removeprefix("sft_"), decision_share)


# ---------------------------------------------------------------- parameter groups

_SHORT = re.compile(r"\._original_component")


def _short_name(name: str) -> str:
    return _SHORT.sub("", name)


def parameter_groups(model) -> list[tuple[str, int, int, str, callable]]:
    """``(component, layer, head, parameter name, slicer)`` covering every parameter exactly once.

    ``slicer(tensor)`` picks the component's part of that parameter (or of its gradient); layer
    and head are -1 where they do not apply. Other layouts (e.g. HuggingFace models) are grouped by
    layer and module (``L0.attn``, ``L0.mlp``) or named by their module, without a split by head.
    """
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head

    def whole(t):
        return t
    out = []
    for name, _ in model.named_parameters():
        short = _short_name(name)
        m = re.fullmatch(r"layers\.(\d+)\.attn\.([qkvo])\.(weight|bias)", short)
        if m:
            layer, which, kind = int(m[1]), m[2], m[3]
            if which == "o" and kind == "bias":
                out.append((f"L{layer}.attn.b_O", layer, -1, name, whole))
                continue
            for h in range(n_heads):
                if which == "o":
                    def sl(t, h=h):
                        return t.view(t.shape[0], n_heads, d_head)[:, h]
                else:
                    def sl(t, h=h):
                        return t.view(n_heads, d_head, *t.shape[1:])[h]
                out.append((f"L{layer}.H{h}", layer, h, name, sl))
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(mlp|ln1|ln2)\..*", short)
        if m:
            out.append((f"L{m[1]}.{m[2]}", int(m[1]), -1, name, whole))
            continue
        m = re.search(r"(?:^|\.)(?:h|layers|blocks)\.(\d+)\.([^.]+)", short)  # other layouts (HuggingFace)
        if m:
            out.append((f"L{m[1]}.{m[2]}", int(m[1]), -1, name, whole))
            continue
        component = {"tok_embed": "embed", "pos": "pos_embed", "ln_out": "ln_final",
                     "head": "unembed"}.get(short.split(".")[0], short.rsplit(".", 1)[0])
        out.append((component, -1, -1, name, whole))
    return out


def _group_sq_norms(model, grads: dict[str, Tensor]) -> dict[tuple[str, int, int], float]:
    sq: dict[tuple[str, int, int], float] = defaultdict(float)
    for component, layer, head, name, sl in parameter_groups(model):
        g = grads.get(name)
        if g is not None:
            sq[(component, layer, head)] += float(sl(g).double().pow(2).sum())
    return sq


# ---------------------------------------------------------------- role gradients

def _activation_names(model) -> list[str]:
    return [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers)
            for h in ("attn.hook_z", "hook_mlp_out")]


def _position_classes(roles: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """Position t predicts token t+1: classify positions by that token's role."""
    nxt = torch.full_like(roles, -1)
    nxt[:, :-1] = roles[:, 1:]
    sample, decision = nxt == SAMPLE, nxt == DECISION
    return {"sample": sample, "decision": decision, "context": ~(sample | decision)}


def role_gradients(model, batch: Trajectories, objective: str, ref=None, **objective_kwargs
                   ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], Terms]:
    """Parameter and activation gradients of each role's part of the loss (and of the whole).

    Returns ``(param_grads, act_grads, terms)``: ``param_grads[part][param_name]`` and
    ``act_grads[part][hook_name]`` (same shape as the activation) for part in ``sample``,
    ``decision``, ``full``. Hooks are removed and ``.grad`` fields are untouched on return,
    also when the call raises.
    """
    names = _activation_names(model)
    params = dict(model.named_parameters())
    act_grads: dict[str, dict[str, Tensor]] = {part: {} for part in (*ROLES, "full")}
    current = {"part": None}

    def bwd(grad, hook, name):
        store = act_grads[current["part"]]
        store[name] = store.get(name, 0) + grad.detach().clone()

    bwd_hooks = [(n, lambda g, hook, n=n: bwd(g, hook, n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), model.hooks(bwd_hooks=bwd_hooks):
            terms = objective_terms(model, batch, objective, ref=ref, **objective_kwargs)
            losses = {**{part: terms.role_loss(role) for part, role in ROLES.items()}, "full": terms.loss}
            param_grads = {}
            for part, loss in losses.items():
                current["part"] = part
                if not loss.requires_grad:  # no token of this role in the batch
                    param_grads[part] = {n: torch.zeros_like(p) for n, p in params.items()}
                    continue
                gs = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
                param_grads[part] = {n: (torch.zeros_like(p) if g is None else g)
                                     for (n, p), g in zip(params.items(), gs)}
    finally:
        model.train(was_training)
    return param_grads, act_grads, terms


def attribute(model, batch: Trajectories, objective: str, ref=None, **objective_kwargs) -> pd.DataFrame:
    """The tidy role table of one objective on one batch.

    Columns: ``objective, source, kind, component, layer, head, position, part, grad_norm,
    n_tokens``. ``kind`` is ``total`` (all parameters), ``param`` (a parameter group) or
    ``activation`` (``position`` is then the position class; else ``all``); ``part`` is
    ``sample``, ``decision`` or ``full``; ``n_tokens`` counts the tokens of that part.
    """
    param_grads, act_grads, terms = role_gradients(model, batch, objective, ref=ref, **objective_kwargs)
    n_tok = {part: int((terms.roles == role).sum()) for part, role in ROLES.items()}
    n_tok["full"] = n_tok["sample"] + n_tok["decision"]
    rows = []
    for part, grads in param_grads.items():
        sq = _group_sq_norms(model, grads)
        rows.append(("total", "all", -1, -1, "all", part, float(np.sqrt(sum(sq.values())))))
        rows += [("param", c, layer, head, "all", part, float(np.sqrt(v))) for (c, layer, head), v in sq.items()]
    classes = _position_classes(terms.roles)
    for part, grads in act_grads.items():
        for name, g in grads.items():
            layer = int(name.split(".")[1])
            for pos_class, mask in classes.items():
                m = mask.to(g.device)[..., None].float()
                if name.endswith("hook_z"):
                    per_head = (g.double().pow(2) * m[..., None]).sum((0, 1, 3)).sqrt()
                    rows += [("activation", f"L{layer}.H{h}", layer, h, pos_class, part, float(v))
                             for h, v in enumerate(per_head)]
                else:
                    rows.append(("activation", f"L{layer}.mlp", layer, -1, pos_class, part,
                                 float((g.double().pow(2) * m).sum().sqrt())))
    df = pd.DataFrame(rows, columns=["kind", "component", "layer", "head", "position", "part", "grad_norm"])
    df.insert(0, "source", batch.source)
    df.insert(0, "objective", objective)
    df["n_tokens"] = df["part"].map(n_tok)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per objective: norms, ratio, cosine, per-token norms and the imbalance index."""
    rows = []
    for (objective, source), g in df[df.kind == "total"].groupby(["objective", "source"], sort=False):
        norm = g.set_index("part")["grad_norm"]
        n = g.set_index("part")["n_tokens"]
        s, d, full = norm["sample"], norm["decision"], norm["full"]
        cosine = (full**2 - s**2 - d**2) / (2 * s * d) if s > 0 and d > 0 else float("nan")
        share_mass = d / (s + d) if s + d > 0 else float("nan")
        share_tokens = n["decision"] / (n["sample"] + n["decision"])
        rows.append({"objective": objective, "source": source, "norm_sample": s, "norm_decision": d,
                     "norm_full": full, "ratio_decision_to_sample": d / s if s > 0 else float("nan"),
                     "cosine": cosine, "per_token_sample": s / max(n["sample"], 1),
                     "per_token_decision": d / max(n["decision"], 1),
                     "decision_mass_share": share_mass, "decision_token_share": share_tokens,
                     "imbalance_index": share_mass / share_tokens})
    return pd.DataFrame(rows)


def head_decision_share(df: pd.DataFrame) -> pd.DataFrame:
    """Per objective, layer and head: ``|g_d| / (|g_s| + |g_d|)`` of that head's parameters."""
    heads = df[(df.kind == "param") & (df["head"] >= 0)]
    wide = heads.pivot_table(index=["objective", "layer", "head"], columns="part", values="grad_norm")
    wide["decision_share"] = wide["decision"] / (wide["sample"] + wide["decision"])
    return wide.reset_index()[["objective", "layer", "head", "decision_share"]]


# ---------------------------------------------------------------- batches for a model

MAX_QUESTIONS = 10**5


def default_batches(model, n_questions: int = 64, group: int = 8, seed: int = 0,
                    temperature: float = 1.0) -> dict[str, Trajectories]:
    """The model's own rollouts (``group`` per training question) and reflective SFT data built
    from its own candidates on as many questions: what RL and SFT would train it on."""
    checks.number("questions", n_questions, lo=1, hi=MAX_QUESTIONS, integer=True)
    checks.number("group", group, lo=2, hi=1024, integer=True)
    checks.seed(seed)
    task = config_of(model).task
    q = sample_questions(task, "train", n_questions, seed).repeat_interleave(group)
    r = rollout(model, q, task=task, temperature=temperature, seed=seed)
    sft = reflective_sft_data(model, task, n_questions * group, seed=seed)
    return {"rollouts": Trajectories.from_rollouts(r, group), "sft_data": Trajectories.from_tokens(sft, task)}


def attribute_all(model, batches: dict[str, Trajectories], ref=None, objectives=OBJECTIVES,
                  decision_share: float = 0.5, kl_estimator: str = "k3") -> pd.DataFrame:
    """:func:`attribute` for each objective: SFT ones on ``batches['sft_data']``, the surrogate
    reward and KL on ``batches['rollouts']``; KL is skipped without a reference model."""
    checks.number("decision_share", decision_share, lo=0, hi=1)
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be one of k1, k3, got {kl_estimator!r}")
    if ref is not None and config_of(ref).task != config_of(model).task:
        raise ValueError("the reference model was trained on another task than the model; pass a "
                         "reference of the same task")
    frames = []
    for objective in objectives:
        if objective == "kl" and ref is None:
            continue
        batch = batches["sft_data" if objective.startswith("sft_") else "rollouts"]
        kwargs = {"decision_share": decision_share} if objective.startswith("sft_") else {}
        if objective == "kl":
            kwargs = {"kl_estimator": kl_estimator}
        frames.append(attribute(model, batch, objective, ref=ref, **kwargs))
    return pd.concat(frames, ignore_index=True)

