"""Where RL changed the network: per-component weight change and cross-model patching in rollouts.

    python analyses/where_rl_changed.py [--sft sft] [--rl rl] [--pairs 32] [--questions 1024] [--top 2]
                                        [--out runs/analyses/where_rl_changed]

1. Relative weight change ``|W_rl - W_sft| / |W_sft|`` of each head (its slices of W_Q, W_K, W_V,
   W_O, b_Q, b_K, b_V) and each MLP, and its Spearman correlation with the RL model's
   activation-patching decision and sampling scores.
2. Cross-model patching during rollouts: the RL model's activations of its top decision
   components (by patching score) replace the SFT model's during full reflective rollouts; the
   DS metrics show how much of RL's change in p_{d|W}, p_{d|C} and realized accuracy they carry.
Writes ``weight_change.csv``, ``transplant.csv``, ``where_rl_changed.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from tsds_interp.ablation import components, rollout_with_hooks, transplant_hooks  # noqa: E402
from tsds_interp.attribution import parameter_groups  # noqa: E402
from tsds_interp.metrics import ds_metrics  # noqa: E402
from tsds_interp.model import config_of, load  # noqa: E402
from tsds_interp.patch import run_patching  # noqa: E402
from tsds_interp.rollout import rollout  # noqa: E402
from tsds_interp.task import sample_questions  # noqa: E402

SHOWN = ("p_s", "p_d_given_c", "p_d_given_w", "realized_accuracy")


def weight_change(sft, rl) -> pd.DataFrame:
    a, b = dict(sft.named_parameters()), dict(rl.named_parameters())
    sq: dict[tuple, list[float]] = {}
    for comp, layer, head, name, sl in parameter_groups(sft):
        d, w = sl(b[name] - a[name]), sl(a[name])
        acc = sq.setdefault((comp, layer, head), [0.0, 0.0])
        acc[0] += float(d.pow(2).sum())
        acc[1] += float(w.pow(2).sum())
    rows = [dict(component=c.replace(".H", "H"), layer=layer, head=head, rel_change=np.sqrt(d / w))
            for (c, layer, head), (d, w) in sq.items()]
    return pd.DataFrame(rows)


def transplant(sft, rl, comps, questions: int, seed: int = 0) -> pd.DataFrame:
    task = config_of(sft).task
    q = sample_questions(task, "test", questions, seed=10_007)
    kw = dict(task=task, seed=seed)
    runs = {"sft": rollout(sft, q, **kw), "rl": rollout(rl, q, **kw),
            "sft + rl components": rollout_with_hooks(sft, q, transplant_hooks(rl, comps), **kw)}
    return pd.concat([ds_metrics(r).assign(model=k) for k, r in runs.items()], ignore_index=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", default="sft")
    p.add_argument("--rl", default="rl")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--questions", type=int, default=1024)
    p.add_argument("--top", type=int, default=2, help="decision heads to transplant")
    p.add_argument("--out", default="runs/analyses/where_rl_changed")
    args = p.parse_args(argv)
    sft, rl = load(args.sft), load(args.rl)
    change = weight_change(sft, rl)
    scores = {}
    for function in ("decision", "sampling"):
        df = run_patching(rl, function, "activation", "head", args.pairs)
        scores[function] = {f"L{a}H{b}": v for a, b, v in zip(df.layer, df["head"], df.value)}
    heads = change[change["head"] >= 0].copy()
    for function, s in scores.items():
        heads[f"patch_{function}"] = heads.component.map(s)
    corr = {f: heads.rel_change.corr(heads[f"patch_{f}"].abs(), method="spearman") for f in scores}
    top = sorted(scores["decision"], key=lambda c: -abs(scores["decision"][c]))[: args.top]
    comps = [c for c in components(rl) if c[2] is not None and f"L{c[1]}H{c[2]}" in top]
    metrics = transplant(sft, rl, comps, args.questions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    change.to_csv(out / "weight_change.csv", index=False)
    heads.to_csv(out / "head_scores.csv", index=False)
    metrics.to_csv(out / "transplant.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.heatmap(heads.pivot(index="layer", columns="head", values="rel_change"), annot=True, fmt=".3f",
                ax=axes[0], cmap="viridis", annot_kws={"size": 7})
    axes[0].set_title("relative weight change SFT -> RL per head")
    allm = metrics[(metrics.cell == "all") & metrics.metric.isin(SHOWN)]
    sns.barplot(allm, x="metric", y="value", hue="model", ax=axes[1])
    axes[1].set(title=f"transplanting RL's {', '.join(top)} into SFT", ylim=(0, 1))
    axes[1].tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(out / "where_rl_changed.png", dpi=120)
    plt.close(fig)
    wide = allm.assign(v=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in allm[["value", "lo", "hi"]].values])
    wide = wide.pivot(index="model", columns="metric", values="v")
    vals = allm.pivot(index="model", columns="metric", values="value")
    carried = {m: (vals.loc["sft + rl components", m] - vals.loc["sft", m]) / (vals.loc["rl", m] - vals.loc["sft", m])
               for m in SHOWN}
    text = "\n".join([
        "# Where RL changed the network", "",
        "Command: `python analyses/where_rl_changed.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        "## Relative weight change per component", "",
        change.sort_values("rel_change", ascending=False).to_markdown(index=False, floatfmt=".4f"), "",
        f"Spearman correlation of head weight change with |RL patching score|: decision {corr['decision']:.2f}, "
        f"sampling {corr['sampling']:.2f} ({len(heads)} heads).", "",
        f"## RL's top decision heads ({', '.join(top)}) transplanted into SFT during rollouts "
        f"({args.questions} held-out questions, all cells)", "",
        wide.to_markdown(), "",
        "Share of RL's change carried ((transplant - sft) / (rl - sft)): "
        + ", ".join(f"{m} {v:.2f}" for m, v in carried.items()), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
