"""Head and MLP ablation during full reflective rollouts, scored with the DS metrics.

``python -m tsds_interp.ablation --checkpoint DIR_OR_NAME [--mode zero|mean|resample]``

Each component (a head's ``hook_z``, a layer's ``hook_mlp_out``) is replaced, at every position of
every decoding step, by zero, by its per-position mean over reference trajectories (the model's
own rollouts on other questions), or by its value on one of those reference trajectories
(resample). Rollouts run through the hooked model (no KV cache), with the same questions and
seed as the unablated baseline, so differences come from the ablation alone.

Labelling rule (documented in README): a component is *sampling* if ablating it moves p_s by at
least ``threshold`` with a 95% interval excluding 0; *decision* if it so moves p_{d|C} or p_{d|W};
*both* if both hold; *neither* otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pandas as pd
import torch

from tsds_interp import checks
from tsds_interp.components import Component, components
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import config_of
from tsds_interp.patching import check_hook_names
from tsds_interp.rollout import progress, rollout
from tsds_interp.stats import proportion_difference
from tsds_interp.task import sample_questions

MODES = ("zero", "mean", "resample")
SCORED = ("p_s", "p_d_given_c", "p_d_given_w", "realized_accuracy")


def _replacement(model, c: Component, mode: str, reference: torch.Tensor):
    if mode == "zero":
        return None
    with torch.no_grad():
        _, cache = model.run_with_cache(reference, names_filter=lambda n: n == c.hook_name)
    act = c.read(cache[c.hook_name])
    if mode == "mean":
        return act.mean(0, keepdim=True)
    perm = torch.randperm(act.shape[0], generator=torch.Generator().manual_seed(0))
    return act[perm]


def ablation_hook(c: Component, replacement: torch.Tensor | None):
    """Forward hook replacing component ``c``'s activation by zero or by ``replacement`` (a batch of
    one is broadcast; otherwise rows cycle through the replacement's rows)."""
    def hook(act, hook):
        n, t = act.shape[:2]
        if replacement is None:
            return c.write(act, act.new_zeros(()))
        rows = torch.arange(n) % replacement.shape[0] if replacement.shape[0] > 1 else torch.zeros(1, dtype=torch.long)
        return c.write(act, replacement[rows, :t])
    return hook


def rollout_with_hooks(model, questions, fwd_hooks, **kw):
    """Reflective rollouts with forward hooks attached (uncached decode through the hooks)."""
    with model.hooks(fwd_hooks=fwd_hooks):  # removes its hooks on exit, also on error
        return rollout(model, questions, cached=False, **kw)


MAX_QUESTIONS = 10**6


def ablation_sweep(model, n_questions: int = 256, mode: str = "zero", seed: int = 0,
                   temperature: float = 1.0, threshold: float = 0.05, quiet: bool = False,
                   max_batch: int = 2048) -> pd.DataFrame:
    """One row per (component, metric): baseline, ablated, delta with 95% CI, and the label."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    checks.number("questions", n_questions, lo=1, hi=MAX_QUESTIONS, integer=True)
    checks.seed(seed)
    checks.number("temperature", temperature, lo=0, hi=100)
    checks.number("threshold", threshold, lo=0, hi=1)
    checks.number("max_batch", max_batch, lo=1, hi=2**20, integer=True)
    task = config_of(model).task
    q = sample_questions(task, "test", n_questions, seed=seed + 5)
    kw = dict(task=task, temperature=temperature, seed=seed, batch_size=max_batch)
    base = ds_metrics(rollout(model, q, **kw)).query("cell == 'all'").set_index("metric")
    reference = rollout(model, sample_questions(task, "train", 128, seed=seed + 6), **kw).tokens
    rows = []
    comps = components(model)
    check_hook_names(model, sorted({c.hook_name for c in comps}))
    for c in progress(comps, f"{mode} ablation", "component", quiet):
        hook = ablation_hook(c, _replacement(model, c, mode, reference))
        m = ds_metrics(rollout_with_hooks(model, q, [(c.hook_name, hook)], **kw)).query("cell == 'all'")
        m = m.set_index("metric")
        for metric in SCORED:
            a, b = base.loc[metric], m.loc[metric]
            d, lo, hi = proportion_difference(a.value, a.n, b.value, b.n)
            rows.append(dict(component=c.label, layer=c.layer, head=-1 if c.head is None else c.head,
                             mode=mode, metric=metric,
                             baseline=base.loc[metric].value, ablated=m.loc[metric].value,
                             delta=d, lo=lo, hi=hi))
    df = pd.DataFrame(rows)
    return df.merge(label_components(df, threshold), on="component")


def label_components(df: pd.DataFrame, threshold: float = 0.05) -> pd.DataFrame:
    """decision / sampling / both / neither per component, by the rule in the module docstring."""
    sig = df.assign(s=(df.delta.abs() >= threshold) & ((df.lo > 0) | (df.hi < 0)))
    out = []
    for comp, part in sig.groupby("component", sort=False):
        s = part.set_index("metric").s
        samp = bool(s.get("p_s", False))
        dec = bool(s.get("p_d_given_c", False) or s.get("p_d_given_w", False))
        out.append(dict(component=comp, label={(True, True): "both", (True, False): "sampling",
                                               (False, True): "decision"}.get((samp, dec), "neither")))
    return pd.DataFrame(out)


def transplant_hooks(source, comps: list[Component]) -> list[tuple[str, Callable]]:
    """Forward hooks for a target model that replace each component in ``comps`` with ``source``'s
    activation on the same tokens: cross-model activation patching that also works during rollouts
    (use with :func:`rollout_with_hooks`)."""
    names = sorted({c.hook_name for c in comps})
    check_hook_names(source, names)
    store: dict[str, torch.Tensor] = {}

    def read_tokens(tokens, hook):
        with torch.no_grad():
            _, cache = source.run_with_cache(tokens, names_filter=lambda n: n in names)
        store.update({n: cache[n] for n in names})

    def replace(c: Component):
        return lambda act, hook: c.write(act, c.read(store[c.hook_name]))

    return [("embed.hook_in", read_tokens)] + [(c.hook_name, replace(c)) for c in comps]


if __name__ == "__main__":  # python -m tsds_interp.ablation
    from tsds_interp.cli.ablation import main

    sys.exit(main())
