"""Where RL changed the network: weight change per component against its decision and sampling scores,
and RL's circuits transplanted into the SFT model.

    python analyses/where_rl_changed.py [--seed-runs runs/new_s0 runs/new_s1 runs/new_s2]
        [--from runs/analyses/circuit_dissociation] [--questions 1024] [--samples 8]
        [--out runs/analyses/where_rl_changed]

Reads the circuits and node scores written by ``analyses/circuit_dissociation.py`` (``--from``; a seed
whose RL model is not there yet is skipped, and a rerun adds it).
Per seed:

1. Relative weight change ``|W_rl - W_sft| / |W_sft|`` of each head (its slices of W_Q, W_K, W_V,
   W_O, b_Q, b_K, b_V) and each MLP; its Spearman correlation with the RL model's decision and
   sampling scores (mean over methods), and the mean change inside each named circuit and outside.
2. RL's decision circuit (and, as a contrast, its sampling circuit) transplanted into the SFT
   model: each component's activation replaced by the RL model's on the same tokens, during
   teacher-forced scoring and full reflective rollouts. Measured on held-out questions of every
   cell: within-question AUC (truth vs the SFT model's own wrong samples, fixed candidates), p_{d|W},
   p_{d|C} and realized accuracy, and the share of RL's change each transplant carries,
   ``(transplant - sft) / (rl - sft)``.
Writes ``weight_change.csv``, ``transplant.csv``, ``where_rl_changed.png`` and ``summary.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from _common import checkpoint_groups, fmt, over_seeds  # noqa: E402

from tsds_interp import cli
from tsds_interp.ablation import rollout_with_hooks, transplant_hooks  # noqa: E402
from tsds_interp.circuits import function_measure  # noqa: E402
from tsds_interp.components import by_label  # noqa: E402
from tsds_interp.gradient_split import parameter_groups  # noqa: E402
from tsds_interp.metrics import ds_metrics  # noqa: E402
from tsds_interp.model import config_of, load  # noqa: E402
from tsds_interp.plotting import wrapped  # noqa: E402
from tsds_interp.rollout import progress  # noqa: E402
from tsds_interp.task import sample_questions  # noqa: E402

SHOWN = ("within_auc", "p_d_given_w", "p_d_given_c", "realized_accuracy", "p_s")


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


def measure(model, hooks, fixed, q, kw) -> dict[str, float]:
    """Within-question (step models: within-state) AUC on fixed candidates and the DS rates of full
    rollouts, with ``hooks``."""
    auc = fixed(hooks)["within_auc"]
    ds = ds_metrics(rollout_with_hooks(model, q, hooks, **kw)).query("cell == 'all'").set_index("metric").value
    return {"within_auc": float(auc.mean()), **{m: float(ds[m]) for m in SHOWN if m != "within_auc"}}


def transplant(sft, rl, circuits: dict[str, list[str]], questions: int, samples: int, seed: int = 0
               ) -> pd.DataFrame:
    task = config_of(sft).task
    q = sample_questions(task, "test", questions, seed=10_007 + seed)
    kw = dict(task=task, seed=seed)
    fixed = {name: function_measure(m, task.train_cells, questions, samples, seed=seed + 1, candidates_from=sft)
             for name, m in (("sft", sft), ("rl", rl))}  # both score the SFT model's own candidates
    rows = [dict(model=name, components="", **measure(m, [], fixed[name], q, kw))
            for name, m in (("sft", sft), ("rl", rl))]
    for function, labels in circuits.items():
        if labels:
            hooks = transplant_hooks(rl, by_label(rl, labels))
            rows.append(dict(model=f"sft + rl {function} circuit", components=" ".join(labels),
                             **measure(sft, hooks, fixed["sft"], q, kw)))
    df = pd.DataFrame(rows).melt(id_vars=["model", "components"], value_vars=list(SHOWN), var_name="metric")
    base = df[df.model == "sft"].set_index("metric").value
    full = df[df.model == "rl"].set_index("metric").value
    df["share_of_rl_change"] = (df.value - df.metric.map(base)) / (df.metric.map(full) - df.metric.map(base))
    return df


def seed_study(sft, rl, named: dict[str, list[str]], scores: pd.DataFrame, args
               ) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Weight change joined with the RL model's scores, its summary row, and the transplant table."""
    change = weight_change(sft, rl)
    change = change[change.component.str.fullmatch(r"L\d+(H\d+|\.mlp)")]  # heads and MLPs
    combined = scores.pivot_table(index="component", columns="function", values="score", aggfunc="mean")
    change = change.join(combined, on="component")
    change["circuit"] = change.component.map({c: f for f, cs in named.items() for c in cs}).fillna("neither")
    row = {**{f"spearman_{f}": change.rel_change.corr(change[f], method="spearman") for f in ("decision", "sampling")},
           **{f"mean_change_{c}": change[change.circuit == c].rel_change.mean()
              for c in ("decision", "sampling", "neither")}}
    return change, row, transplant(sft, rl, named, args.questions, args.samples)


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/where_rl_changed.py", __doc__.split("\n\n")[0])
    p.add_argument("--seed-runs", nargs="*", help="run folders holding sft/ and rl/ checkpoints; default: shipped")
    p.add_argument("--from", dest="source", default="runs/analyses/circuit_dissociation",
                   help="output folder of analyses/circuit_dissociation.py (circuits.csv, node_scores.csv)")
    p.add_argument("--questions", type=cli.integer(1), default=1024)
    p.add_argument("--samples", type=cli.integer(1), default=8)
    cli.add_output(p, "runs/analyses/where_rl_changed",
                   "output folder; per-seed results are kept in OUT/parts, so a rerun resumes")
    return p


def _run(args, argv=None) -> int:
    src = Path(args.source) / "parts"
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    groups = checkpoint_groups(["sft", "rl"], args.seed_runs)
    changes, transplants, corr = [], [], []
    for seed, (sft_ckpt, rl_ckpt) in progress(list(enumerate(zip(groups["sft"], groups["rl"]))), "seeds", "seed"):
        info_file = src / f"rl_s{seed}.json"
        if not info_file.is_file():
            print(f"seed {seed}: no {info_file} yet (run analyses/circuit_dissociation.py); skipped", flush=True)
            continue
        stem = out / "parts" / f"s{seed}"
        if not Path(f"{stem}_corr.json").is_file():  # per-seed results are kept: a rerun resumes
            info = json.loads(info_file.read_text())
            named = {"decision": info["decision"].split(), "sampling": info["sampling"].split()}
            scores = pd.read_csv(src / f"rl_s{seed}_scores.csv")
            change, row, trans = seed_study(load(sft_ckpt), load(rl_ckpt), named, scores, args)
            change.to_csv(f"{stem}_change.csv", index=False)
            trans.to_csv(f"{stem}_transplant.csv", index=False)
            Path(f"{stem}_corr.json").write_text(json.dumps(row))
            print(f"seed {seed}: RL circuits {named}", flush=True)
        changes.append(pd.read_csv(f"{stem}_change.csv").assign(seed=seed))
        transplants.append(pd.read_csv(f"{stem}_transplant.csv", dtype={"components": str}).fillna({"components": ""})
                           .assign(seed=seed))
        corr.append({"seed": seed, **json.loads(Path(f"{stem}_corr.json").read_text())})
    if not corr:
        raise SystemExit(f"error: no RL circuits in {src}; run analyses/circuit_dissociation.py first or pass --from")
    change, trans, corr = pd.concat(changes), pd.concat(transplants), pd.DataFrame(corr)
    change.to_csv(out / "weight_change.csv", index=False)
    trans.to_csv(out / "transplant.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.4]})
    heads = change[(change.seed == 0) & (change["head"] >= 0)]
    sns.heatmap(heads.pivot(index="layer", columns="head", values="rel_change"), annot=True, fmt=".3f",
                ax=axes[0], cmap="viridis", vmin=0, annot_kws={"size": 7},
                cbar_kws={"label": "relative change (0 = unchanged)"})
    axes[0].set_title(wrapped("relative weight change SFT -> RL per head, |W_RL - W_SFT| / |W_SFT| (seed 0)", 3.6),
                      fontsize=10)
    sns.barplot(trans, x="metric", y="value", hue="model", ax=axes[1], errorbar=("ci", 95))
    k = trans.seed.nunique()
    spread = f"mean over {k} seeds with 95% bootstrap intervals over seeds" if k > 1 else "one seed, no interval"
    axes[1].set_title(wrapped(f"RL's circuits transplanted into SFT: bars, {spread}; n = {args.questions} "
                              "held-out questions per model", 6.5), fontsize=10)
    axes[1].set(ylim=(0, 1), ylabel="held-out value")
    axes[1].tick_params(axis="x", rotation=15)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "where_rl_changed.png", dpi=120)
    plt.close(fig)
    values = over_seeds(trans.assign(label=trans.model, cell="all", lo=np.nan, hi=np.nan), "value")
    table = values.assign(v=[fmt(m, lo, hi) for m, lo, hi in values[["mean", "lo", "hi"]].to_numpy()]).pivot(
        index="label", columns="metric", values="v").reindex(columns=list(SHOWN))
    shares = trans[trans.model.str.startswith("sft + ")].pivot_table(index=["model", "seed"], columns="metric",
                                                                       values="share_of_rl_change",
                                                                       dropna=False).reindex(columns=list(SHOWN))
    text = "\n".join([
        "# Where RL changed the network", "",
        "Command: `python analyses/where_rl_changed.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        f"## Weight change SFT -> RL and the RL model's component scores ({k} seeds)", "",
        corr.to_markdown(index=False, floatfmt=".3f"), "",
        "Largest relative changes (seed 0):", "",
        change[change.seed == 0].sort_values("rel_change", ascending=False).head(8)
        .to_markdown(index=False, floatfmt=".4f"), "",
        f"## RL's circuits transplanted into SFT ({args.questions} held-out questions, all cells; "
        f"mean over {k} seeds, 95% t-interval)", "",
        table.to_markdown(), "",
        "Share of RL's change carried, (transplant - sft) / (rl - sft), per seed (undefined or unstable "
        "where RL barely differs from SFT):", "",
        shares.to_markdown(floatfmt=".2f"), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="where_rl_changed")

if __name__ == "__main__":
    sys.exit(main())
