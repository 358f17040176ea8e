"""Name a decision circuit and a sampling circuit from several methods, then test them by ablation.

A component is a head (``L{l}H{h}``, its ``hook_z``) or an MLP (``L{l}.mlp``, its ``hook_mlp_out``).
:func:`node_scores` scores every component for each function by three node-level methods and,
optionally, by its edges:

- ``activation``: exact patching of the component at every position (denoising: clean into the
  corrupted run), effect = change of the pair metric;
- ``attribution``: attribution patching of the same (gradient x activation difference);
- ``ablation``: mean-ablation during full reflective rollouts (:func:`tsds_interp.ablation.ablation_sweep`),
  effect on p_s (sampling) and the larger of the changes in p_{d|C} and p_{d|W} (decision);
- ``edges``: the summed |edge attribution| (integrated gradients) of the edges into and out of the
  component (:mod:`tsds_interp.edges`).

:func:`name_circuits` ranks components by the mean over methods of |effect| / the method's largest
|effect| and names as a function's circuit the components that score clearly higher for it than
for the other function (components both need are reported as shared). :func:`dissociation` ablates a whole circuit
and measures what it was named for, on held-out questions: the decision's within-question AUC
(truth vs the unablated model's own wrong samples, teacher-forced, so the candidates stay fixed and
only the decision can change) and p_s (greedy and sampled first-attempt accuracy from rollouts of
the ablated model). A decision circuit should move the AUC toward 0.5 and leave p_s; a sampling
circuit the reverse. On step models the same holds per state: the true step against the model's own
wrong steps from that state, and first-attempt step accuracy. Controls are random sets matched in
type and size (head for head, MLP for MLP); mean- and resample-ablation are both available.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from tsds_interp.ablation import ablation_hook, ablation_sweep, rollout_with_hooks
from tsds_interp.components import Component, by_label, components
from tsds_interp.edges import edge_attribution
from tsds_interp.model import config_of
from tsds_interp.pairs import Pairs, own_samples
from tsds_interp.patching import attribution_patch
from tsds_interp.rollout import rollout, sample_steps
from tsds_interp.stats import boot_mean, mean_gap, proportion_difference, wilson, within_auc
from tsds_interp.task import (
    Questions,
    TaskConfig,
    check_steps,
    question_states,
    random_states,
    sample_questions,
    state_tokens,
    true_step_tokens,
)
from tsds_interp.verification import decision_scores, score_candidates

METHODS = ("activation", "attribution", "ablation", "edges")


@torch.no_grad()
def patch_components(model, pairs: Pairs) -> pd.Series:
    """Exact activation patching of every component at all positions (clean into corrupted):
    change of the pair metric, indexed by component label."""
    base = float(pairs.metric(model(pairs.corrupted)))
    comps = components(model)
    names = sorted({c.hook_name for c in comps})
    _, clean = model.run_with_cache(pairs.clean, names_filter=lambda n: n in names)
    out = {}
    for c in comps:
        hook = ablation_hook(c, c.read(clean[c.hook_name]))
        patched = model.run_with_hooks(pairs.corrupted, fwd_hooks=[(c.hook_name, hook)])
        out[c.label] = float(pairs.metric(patched)) - base
    return pd.Series(out)


def attribute_components(model, pairs: Pairs) -> pd.Series:
    """Attribution patching of every component at all positions, indexed by component label."""
    heads = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head")
    mlps = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "mlp_out").sum(1)
    out = {Component("head", layer, h).label: float(heads[layer, h]) for layer in range(heads.shape[0])
           for h in range(heads.shape[1])}
    out.update({Component("mlp", layer).label: float(v) for layer, v in enumerate(mlps)})
    return pd.Series(out)


def edge_scores(model, pairs: dict[str, Pairs], ig_steps: int = 5) -> pd.DataFrame:
    """Edge attribution (integrated gradients) of every edge for each function's pairs."""
    return pd.concat([edge_attribution(model, p.clean, p.corrupted, p.metric, ig_steps=ig_steps).assign(function=f)
                      for f, p in pairs.items()], ignore_index=True)


def node_scores(model, pairs: dict[str, Pairs], questions: int = 256, seed: int = 0, quiet: bool = True,
                edges: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (component, function, method): ``effect`` and ``score`` = |effect| / the largest
    |effect| of that method and function. ``pairs`` maps 'decision' and 'sampling' to contrast pairs.
    With ``edges`` (:func:`edge_scores`), a fourth method: the summed |score| of a component's edges."""
    rows = []
    if edges is not None:
        for function, part in edges.groupby("function"):
            mass = part.assign(a=part.score.abs()).melt(id_vars="a", value_vars=["source", "target"])
            mass = mass.groupby("value").a.sum().drop(["embed", "logits"], errors="ignore")
            rows += [dict(component=c, function=function, method="edges", effect=v) for c, v in mass.items()]
    for function, p in pairs.items():
        for method, effects in (("activation", patch_components(model, p)),
                                ("attribution", attribute_components(model, p))):
            rows += [dict(component=c, function=function, method=method, effect=v) for c, v in effects.items()]
    if questions:
        abl = ablation_sweep(model, questions, "mean", seed, quiet=quiet).pivot_table(
            index="component", columns="metric", values="delta", sort=False)
        for comp, d in abl.iterrows():
            dec = d.p_d_given_c if abs(d.p_d_given_c) >= abs(d.p_d_given_w) else d.p_d_given_w
            rows += [dict(component=comp, function="sampling", method="ablation", effect=d.p_s),
                     dict(component=comp, function="decision", method="ablation", effect=dec)]
    df = pd.DataFrame(rows)
    peak = df.groupby(["function", "method"]).effect.transform(lambda x: x.abs().max())
    df["score"] = (df.effect.abs() / peak.where(peak > 0)).fillna(0.0)
    return df


def combined_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Component x function table of the mean score over methods."""
    return scores.pivot_table(index="component", columns="function", values="score", aggfunc="mean", sort=False)


def name_circuits(scores: pd.DataFrame, k: int = 3, margin: float = 0.25) -> dict[str, list[str]]:
    """Per function, up to ``k`` components whose mean score over methods for that function exceeds
    their mean score for the other function by at least ``margin``, best first. The circuits are
    disjoint, so an ablation can tell them apart; :func:`shared_components` lists what both need."""
    table = combined_scores(scores)
    out = {}
    for f, other in (("decision", "sampling"), ("sampling", "decision")):
        specific = table[f] - table[other]
        out[f] = specific[specific >= margin].sort_values(ascending=False).index[:k].tolist()
    return out


def shared_components(scores: pd.DataFrame, threshold: float = 0.5) -> list[str]:
    """Components whose mean score over methods is at least ``threshold`` for both functions."""
    table = combined_scores(scores)
    return sorted(table.index[(table["decision"] >= threshold) & (table["sampling"] >= threshold)])


ABLATIONS = ("mean", "resample")


def ablation_hooks(model, comps: list[Component], reference: Int[Tensor, "batch pos"], kind: str = "mean",
                   seed: int = 0) -> list:
    """Forward hooks replacing each component by its activation on ``reference`` tokens (other
    questions or states than the ablated run's): ``mean`` its per-position mean over them,
    ``resample`` one reference row per ablated row (a seeded permutation, rows cycling)."""
    if kind not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {kind!r}")
    names = sorted({c.hook_name for c in comps})
    with torch.no_grad():
        _, cache = model.run_with_cache(reference, names_filter=lambda n: n in names)
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))
    hooks = []
    for c in comps:
        act = c.read(cache[c.hook_name])
        hooks.append((c.hook_name, ablation_hook(c, act.mean(0, keepdim=True) if kind == "mean" else act[perm])))
    return hooks


def matched_controls(sets: dict[str, list[Component]], pool: list[Component], n: int, rng: np.random.Generator
                     ) -> dict[str, list[Component]]:
    """For each named set, ``n`` random sets from ``pool`` with as many heads and as many MLPs
    (type- and size-matched; fewer where the pool runs short)."""
    out = {}
    for label, comps in sets.items():
        for i in range(n):
            pick = []
            for kind in ("head", "mlp"):
                want = sum(c.kind == kind for c in comps)
                of_kind = [c for c in pool if c.kind == kind]
                pick += [of_kind[j] for j in sorted(rng.choice(len(of_kind), min(want, len(of_kind)), replace=False))]
            out[f"{label} control {i}"] = pick
    return out


def _decision_questions(task, cells, n: int, seed: int) -> Questions:
    """Distinct held-out questions of ``cells`` (at most ``n``)."""
    q = sample_questions(task, "test", n, seed=seed, cells=cells)
    keep = np.unique(np.stack([q.a.numpy(), q.b.numpy()], 1), axis=0, return_index=True)[1]
    return q[torch.as_tensor(np.sort(keep))]


def _oneshot_measure(model, task, chosen, n_questions, samples, temperature, seed, source):
    """``measure(hooks)`` for one-shot models: within-question AUC and logit gap of the truth vs the
    unablated model's own wrong answers (fixed), and greedy / sampled first-attempt accuracy."""
    qd = _decision_questions(task, chosen, n_questions, seed + 11)
    sampled = own_samples(source, qd, task, samples, temperature, seed + 12)
    qs = sample_questions(task, "test", n_questions, seed=seed + 13)
    kw = dict(task=task, budget=1, seed=seed + 14)

    def measure(hooks):
        def scorer(t):
            return _hooked(model, hooks, lambda: decision_scores(model, t))
        v = score_candidates(qd, sampled[:, 0], sampled, task, scorer, attempts=1)
        truth, wrong = v.attempts[0]["truth"], v.attempts[0]["wrong"]
        greedy = rollout_with_hooks(model, qs, hooks, temperature=0.0, **kw).correct[:, 0].numpy().astype(float)
        sample = rollout_with_hooks(model, qs, hooks, temperature=temperature, **kw).correct[:, 0].numpy().astype(float)
        return dict(within_auc=within_auc(truth, wrong), logit_gap=mean_gap(truth, wrong), greedy_accuracy=greedy,
                    sample_accuracy=sample)
    return measure


def _step_measure(model, task, chosen, n_questions, samples, temperature, seed, source):
    """``measure(hooks)`` for step models: within-state AUC and logit gap of the true step vs the
    unablated model's own wrong steps from the same state (fixed), and greedy / sampled first-attempt
    step accuracy (p_s) on held-out states of every cell."""
    P, L = task.prompt_len, task.answer_len
    sd = question_states(_decision_questions(task, chosen, n_questions, seed + 11), task, seed + 15)
    idx = torch.arange(len(sd)).repeat_interleave(samples)
    own = sample_steps(source, sd[idx], task, temperature, seed=seed + 12)[0][:, P : P + L]
    wrong = (own <= 9).all(1) & ~check_steps(sd[idx], own.clamp(max=9), task)
    truth_rows = torch.cat([state_tokens(sd, task), true_step_tokens(sd, task)], 1)
    wrong_rows = torch.cat([state_tokens(sd[idx[wrong]], task), own[wrong]], 1)
    owner = idx[wrong].numpy()
    has = np.unique(owner)
    ss = random_states(task, "test", n_questions, seed=seed + 13)

    def accuracy(hooks, temp):
        with model.hooks(fwd_hooks=hooks):
            steps = sample_steps(model, ss, task, temp, seed=seed + 14, cached=False)[0][:, P : P + L]
        return (check_steps(ss, steps.clamp(max=9), task) & (steps <= 9).all(1)).numpy().astype(float)

    def measure(hooks):
        gt = _hooked(model, hooks, lambda: decision_scores(model, truth_rows))[0].numpy()
        gw = _hooked(model, hooks, lambda: decision_scores(model, wrong_rows))[0].numpy()
        truth, wrong_scores = gt[has], [gw[owner == q] for q in has]
        return dict(within_auc=within_auc(truth, wrong_scores), logit_gap=mean_gap(truth, wrong_scores),
                    greedy_accuracy=accuracy(hooks, 0.0), sample_accuracy=accuracy(hooks, temperature))
    return measure


def function_measure(model, cells, n_questions: int = 512, samples: int = 32, temperature: float = 1.0,
                     seed: int = 0, candidates_from=None):
    """``measure(hooks) -> {within_auc, logit_gap, greedy_accuracy, sample_accuracy}`` (per question
    or state arrays) of ``model`` run with forward ``hooks``: the decision on fixed candidates (the
    truth against the hook-free model's own wrong candidates, or those of ``candidates_from``; questions
    or states of ``cells``) and first-attempt accuracy of what the hooked model writes (every
    in-distribution cell)."""
    task = config_of(model).task
    make = _step_measure if task.steps else _oneshot_measure
    return make(model, task, task.in_distribution(cells) if isinstance(cells, str) else tuple(cells),
                n_questions, samples, temperature, seed, candidates_from or model)


def dissociation(model, circuits: dict[str, list[str]], cells: str | list[str], n_questions: int = 512,
                 samples: int = 32, temperature: float = 1.0, seed: int = 0, n_boot: int = 1000,
                 controls: int = 1, top1: bool = True, ablations: tuple[str, ...] = ("mean",)) -> pd.DataFrame:
    """Effects of ablating each circuit and, with ``top1``, its best component alone, beside
    ``controls`` type-matched random sets for each (as many heads and MLPs, drawn with ``seed`` from
    the components of neither circuit; pass a different seed per model). Each ablation kind in
    ``ablations`` (``mean``, ``resample``: activations from other questions or states) gives its own
    rows: (ablation, ablated, metric, value, delta, lo, hi, n) with 95% intervals of the change from
    the unablated model.

    - ``within_auc``: per question (one-shot) or state (steps) of ``cells`` with a wrong candidate,
      the paired AUC of the truth against the unablated model's own wrong candidates (``samples``
      each), scored by the ablated decision; bootstrap over questions of the paired change;
    - ``logit_gap``: the same pairs' mean ACCEPT-REJECT gap;
    - ``greedy_accuracy`` and ``sample_accuracy`` (p_s at temperature 0 and ``temperature``) over
      ``n_questions`` held-out questions (states) of every in-distribution cell, produced by the
      ablated model; normal-approximation interval of the difference.
    """
    task = config_of(model).task
    chosen = task.in_distribution(cells)
    rng = np.random.default_rng(seed)
    reference = rollout(model, sample_questions(task, "train", 256, seed=seed + 6), task=task, seed=seed).tokens
    sets = {f"{f} circuit": by_label(model, labels) for f, labels in circuits.items() if labels}
    if top1:
        sets.update({f"{f} top component": by_label(model, labels[:1]) for f, labels in circuits.items()
                     if len(labels) > 1})
    named = {c for labels in circuits.values() for c in labels}
    sets.update(matched_controls(dict(sets), [c for c in components(model) if c.label not in named], controls, rng))
    measure = function_measure(model, chosen, n_questions, samples, temperature, seed)
    base = measure([])
    rows = [dict(_effect_row("none", m, x, x, rng, n_boot), ablation="none") for m, x in base.items()]
    for kind in ablations:
        for label, comps in sets.items():
            hit = measure(ablation_hooks(model, comps, reference, kind, seed=seed + 17))
            rows += [dict(_effect_row(label, m, base[m], hit[m], rng, n_boot), ablation=kind) for m in base]
    df = pd.DataFrame(rows)
    df["components"] = df.ablated.map({k: " ".join(c.label for c in v) for k, v in sets.items()}).fillna("")
    df["cells"] = TaskConfig.format_cells(chosen)
    return df


def _hooked(model, hooks, fn):
    with model.hooks(fwd_hooks=hooks):
        return fn()


def _effect_row(label: str, metric: str, before: np.ndarray, after: np.ndarray, rng, n_boot: int) -> dict:
    """Value after ablation and the change from before (paired by question) with a 95% interval."""
    n = len(after)
    if metric in ("within_auc", "logit_gap"):
        _, lo, hi = boot_mean(after - before, rng, n_boot)
    else:
        _, lo, hi = proportion_difference(before.mean(), n, after.mean(), n)
    value = float(after.mean()) if n else np.nan
    delta = float((after - before).mean()) if n else np.nan
    if metric in ("greedy_accuracy", "sample_accuracy"):
        vlo, vhi = wilson(after.sum(), n)
    else:
        vlo = vhi = np.nan
    return dict(ablated=label, metric=metric, value=value, value_lo=float(vlo), value_hi=float(vhi),
                delta=delta, lo=float(lo), hi=float(hi), n=n)
