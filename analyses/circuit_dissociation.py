"""The decision and sampling circuits of SFT and RL models, named by three methods and tested by ablation.

    python analyses/circuit_dissociation.py [--seed-runs runs/new_s0 runs/new_s1 runs/new_s2]
        [--labels sft rl] [--pairs 32] [--questions 256] [--eval-questions 1024] [--samples 64]
        [--k 3] [--margin 0.25] [--controls 3] [--ablations mean resample]
        [--out runs/analyses/circuit_dissociation]
    python analyses/circuit_dissociation.py --labels steps_sft steps_rl        # shipped step models
    python analyses/circuit_dissociation.py --seed-runs runs/steps_s0 runs/steps_s1 runs/steps_s2

Per model: decision pairs (truth vs the model's own wrong sample, cells where its decision separates
them) and sampling pairs; every head and MLP scored by exact activation patching, attribution
patching and mean-ablation during rollouts (:func:`tsds_interp.circuits.node_scores`) and by its
edges; circuits
named by :func:`~tsds_interp.circuits.name_circuits`; then each circuit, its top component, and
``--controls`` random sets matched to each in type and size (head for head, MLP for MLP; drawn with a
different seed per model) are ablated on held-out questions (step models: states), by mean- and by
resample-ablation (:func:`~tsds_interp.circuits.dissociation`). Works on one-shot and step models.
Edge attribution (integrated gradients) of every edge is a fourth vote and is drawn as a pruned
graph per model and function. Writes ``node_scores.csv``, ``edges.csv``, ``graph_*.png``,
``circuits.csv``, ``dissociation.csv``, ``dissociation.png`` and
``summary.md`` (the 2 x 2 table: circuit ablated x what it changes, mean over seeds, 95% t-interval).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from _common import checkpoint_groups, each_model, fmt, over_seeds  # noqa: E402

from tsds_interp import cli
from tsds_interp.circuits import (  # noqa: E402
    dissociation,
    edge_scores,
    name_circuits,
    node_scores,
    shared_components,
)
from tsds_interp.edges import draw_graph, prune  # noqa: E402
from tsds_interp.model import load  # noqa: E402
from tsds_interp.pairs import make_pairs  # noqa: E402
from tsds_interp.plotting import wrapped  # noqa: E402
from tsds_interp.rollout import progress  # noqa: E402

EFFECTS = ("within_auc", "logit_gap", "logit_gap_share", "greedy_accuracy", "sample_accuracy")


def study(ckpt: str, args, model_seed: int) -> tuple[pd.DataFrame, dict, pd.DataFrame, pd.DataFrame]:
    """One model: pairs, edge and node scores, circuits, and the ablation table (controls drawn with ``model_seed``)."""
    model = load(ckpt)
    pairs = {"decision": make_pairs(model, "decision", args.pairs, args.seed),
             "sampling": make_pairs(model, "sampling", args.pairs, args.seed, "all")}
    gap = pairs["decision"].gap(model)
    edges = edge_scores(model, pairs)
    scores = node_scores(model, pairs, args.questions, args.seed, edges=edges)
    circuits = name_circuits(scores, args.k, args.margin)
    info = dict(decision=" ".join(circuits["decision"]), sampling=" ".join(circuits["sampling"]),
                shared=" ".join(shared_components(scores)), cells=",".join(pairs["decision"].cells),
                cell_rule=pairs["decision"].cell_rule, decision_gap=gap[0], gap_lo=gap[1], gap_hi=gap[2],
                own_wrong_pairs=pairs["decision"].origin.count("model"))
    effects = dissociation(model, circuits, pairs["decision"].cells, args.eval_questions, args.samples,
                           seed=model_seed, controls=args.controls, ablations=tuple(args.ablations))
    return scores, info, effects, edges


def with_gap_share(effects: pd.DataFrame) -> pd.DataFrame:
    """Adds ``logit_gap_share``: the change of the logit gap as a share of the model's unablated gap
    (comparable across seeds whose gaps differ)."""
    gap = effects[effects.metric == "logit_gap"]
    base = gap[gap.ablated == "none"].set_index(["label", "seed"]).value
    scale = base.reindex(pd.MultiIndex.from_frame(gap[["label", "seed"]])).to_numpy()
    share = gap.assign(metric="logit_gap_share", value=gap.value / scale, delta=gap.delta / scale,
                       lo=gap.lo / scale, hi=gap.hi / scale)
    return pd.concat([effects, share], ignore_index=True)


def kind_of(ablated: str) -> str:
    """``decision circuit control 2`` -> ``decision circuit (controls)``; named sets unchanged."""
    return ablated.split(" control ")[0] + " (controls)" if " control " in ablated else ablated


def two_by_two(effects: pd.DataFrame) -> pd.DataFrame:
    """Rows: model x ablation kind x ablated set (controls pooled); columns: each effect as mean
    [95% interval] over seeds (and controls); one seed and one set: that set's own interval."""
    effects = with_gap_share(effects)
    eff = effects[effects.ablated != "none"].assign(ablated=lambda d: d.ablated.map(kind_of))
    keys = ("label", "ablation", "ablated", "metric")
    if eff.groupby(list(keys)).size().max() > 1:
        agg = over_seeds(eff, "delta", keys=keys)
    else:
        agg = eff.rename(columns={"delta": "mean"}).assign(seeds=1)
    agg["cell"] = [fmt(m, lo, hi) for m, lo, hi in agg[["mean", "lo", "hi"]].to_numpy()]
    return agg.pivot_table(index=["label", "ablation", "ablated"], columns="metric", values="cell",
                           aggfunc="first", sort=False)[list(EFFECTS)]


def targets(effects: pd.DataFrame) -> pd.DataFrame:
    """The dissociation targets per model and ablation kind (mean over seeds): the decision circuit
    lowers within_auc by >= 0.25 with |change of p_s| <= 0.05, the sampling circuit lowers p_s
    (sample_accuracy) by >= 0.30 with |change of within_auc| <= 0.05, each beyond its type-matched
    controls (its mean below the lower end of the controls' 95% interval over seeds and controls)."""
    eff = effects[effects.ablated != "none"].assign(ablated=lambda d: d.ablated.map(kind_of))
    agg = over_seeds(eff, "delta", keys=("label", "ablation", "ablated", "metric")).set_index(
        ["label", "ablation", "ablated", "metric"])
    rows = []
    for (label, kind) in agg.index.droplevel([2, 3]).unique():
        for f, main, side, need in (("decision", "within_auc", "sample_accuracy", -0.25),
                                    ("sampling", "sample_accuracy", "within_auc", -0.30)):
            key, ctrl_key = (label, kind, f"{f} circuit"), (label, kind, f"{f} circuit (controls)")
            if key + (main,) not in agg.index:
                continue
            own, side_change = agg.loc[key + (main,)], agg.loc[key + (side,), "mean"]
            ctrl = agg.loc[ctrl_key + (main,)] if ctrl_key + (main,) in agg.index else None
            beyond = ctrl is not None and own["mean"] < ctrl["lo"]
            rows.append(dict(label=label, ablation=kind, circuit=f, main=main, change=own["mean"],
                             controls=fmt(ctrl["mean"], ctrl["lo"], ctrl["hi"]) if ctrl is not None else "—",
                             side=side, side_change=side_change, beyond_controls=bool(beyond),
                             met=bool(own["mean"] <= need and abs(side_change) <= 0.05 and beyond)))
    return pd.DataFrame(rows)


def figure(effects: pd.DataFrame, path: Path, questions: int) -> None:
    """Per effect: the change when each circuit (circle) or its top component (square) is ablated,
    one point per seed with its 95% interval, beside the mean over its matched controls (grey)."""
    eff = with_gap_share(effects)
    eff = eff[eff.ablated != "none"].assign(ablated=lambda d: d.ablated.map(kind_of))
    eff = eff.groupby(["label", "ablation", "ablated", "metric", "seed"], sort=False).agg(
        delta=("delta", "mean"), lo=("lo", "mean"), hi=("hi", "mean")).reset_index()
    groups = list(eff.groupby(["label", "ablation", "ablated"], sort=False).groups)
    fig, axes = plt.subplots(len(EFFECTS), 1, figsize=(max(8.0, 0.45 * len(groups) + 2), 2.6 * len(EFFECTS)),
                             sharex=True)
    for ax, metric in zip(axes, EFFECTS):
        part = eff[eff.metric == metric]
        for i, key in enumerate(groups):
            g = part[(part.label == key[0]) & (part.ablation == key[1]) & (part.ablated == key[2])]
            x = i + 0.1 * (g.seed.to_numpy() - g.seed.mean())
            color = "grey" if "controls" in key[2] else "C0" if key[2].startswith("decision") else "C1"
            ax.errorbar(x, g.delta, yerr=[(g.delta - g.lo).clip(lower=0), (g.hi - g.delta).clip(lower=0)],
                        fmt="s" if "top" in key[2] else "o", ms=4, capsize=2, color=color)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel(f"change in\n{metric}", fontsize=8)
    axes[-1].set_xticks(range(len(groups)), [f"{a} {b}: {c}" for a, b, c in groups], fontsize=7, rotation=90)
    seeds = int(effects.groupby("label").seed.nunique().min())
    fig.suptitle(wrapped(f"Ablating each circuit (blue: decision, orange: sampling, grey: its type-matched controls, "
                         f"mean over controls; squares: top component); one point per seed ({seeds} "
                         f"seed{'s' * (seeds > 1)}), 95% intervals; n = {questions} held-out questions per ablation",
                         fig.get_figwidth()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/circuit_dissociation.py", __doc__.split("\n\n")[0])
    p.add_argument("--seed-runs", nargs="*", help="run folders holding LABEL/checkpoint; default: shipped models")
    p.add_argument("--labels", nargs="+", default=["sft", "rl"])
    p.add_argument("--pairs", type=cli.integer(1), default=32)
    p.add_argument("--questions", type=cli.integer(1), default=256, help="rollout questions per component ablation")
    p.add_argument("--eval-questions", type=cli.integer(1), default=1024)
    p.add_argument("--samples", type=cli.integer(1), default=64, help="own samples per decision question")
    p.add_argument("--k", type=cli.integer(1), default=3, help="largest circuit size")
    p.add_argument("--margin", type=cli.real(0, 1), default=0.25)
    p.add_argument("--controls", type=cli.integer(1), default=3,
                   help="type- and size-matched random sets per named set")
    p.add_argument("--ablations", nargs="+", choices=("mean", "resample"), default=["mean", "resample"])
    p.add_argument("--graph-edges", type=cli.integer(1), default=12, help="edges drawn per circuit graph")
    p.add_argument("--seed", type=cli.SEED, default=0)
    cli.add_output(p, "runs/analyses/circuit_dissociation",
                   "output folder; per-model results are kept in OUT/parts, so a rerun resumes")
    return p


def _run(args, argv=None) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_scores, infos, all_effects, all_edges = [], [], [], []
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    for label, seed, ckpt in progress(each_model(checkpoint_groups(args.labels, args.seed_runs)), "circuits", "model"):
        tag = dict(label=label, seed=seed, checkpoint=ckpt)
        stem = parts / f"{label}_s{seed}"
        if not (done := Path(f"{stem}.json")).is_file():  # each model's results are kept: a rerun resumes
            model_seed = args.seed + 1 + 1000 * seed + zlib.crc32(label.encode()) % 997  # per model
            scores, info, effects, edges = study(ckpt, args, model_seed)
            scores.to_csv(f"{stem}_scores.csv", index=False)
            effects.to_csv(f"{stem}_effects.csv", index=False)
            edges.to_csv(f"{stem}_edges.csv", index=False)
            done.write_text(json.dumps(info))
        info = json.loads(done.read_text())
        all_scores.append(pd.read_csv(f"{stem}_scores.csv").assign(**tag))
        all_effects.append(pd.read_csv(f"{stem}_effects.csv", keep_default_na=False, na_values=[""]).assign(**tag))
        all_edges.append(pd.read_csv(f"{stem}_edges.csv").assign(**tag))
        model = load(ckpt)
        for function, part in all_edges[-1].groupby("function"):  # drawn on every run: a rerun's results
            draw_graph(prune(part, args.graph_edges), model, out / f"graph_{label}_s{seed}_{function}.png",
                       f"{label} seed {seed}: top {args.graph_edges} {function} edges (IG edge attribution, "
                       f"n = {args.pairs} pairs)")
        infos.append({**tag, **info})
        print(f"{label} seed {seed}: {info}", flush=True)
    scores, circuits, effects = (pd.concat(all_scores), pd.DataFrame(infos), pd.concat(all_effects))
    scores.to_csv(out / "node_scores.csv", index=False)
    edges = pd.concat(all_edges)
    edges.to_csv(out / "edges.csv", index=False)
    top_edges = (edges.assign(a=edges.score.abs()).sort_values("a", ascending=False)
                 .groupby(["label", "seed", "function"], sort=False).head(5).drop(columns=["a", "checkpoint"]))
    top_edges = top_edges.sort_values(["label", "seed", "function", "score"], key=lambda c: c if c.name != "score"
                                      else -c.abs())
    circuits.to_csv(out / "circuits.csv", index=False)
    effects.to_csv(out / "dissociation.csv", index=False)
    figure(effects, out / "dissociation.png", args.questions)
    base = effects[effects.ablated == "none"].pivot_table(index=["label", "seed"], columns="metric", values="value")
    text = "\n".join([
        "# Decision and sampling circuits: named by three methods, tested by ablation", "",
        "Command: `python analyses/circuit_dissociation.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        "## Circuits per model", "", circuits.drop(columns="checkpoint").to_markdown(index=False, floatfmt=".3f"), "",
        "## Top 5 edges per model and function (edge attribution, 5 integrated-gradient steps)", "",
        top_edges.to_markdown(index=False, floatfmt=".3f"), "",
        "## Unablated models (deciding cells for within_auc / logit_gap, all cells for accuracies)", "",
        base.to_markdown(floatfmt=".3f"), "",
        "## Change when a set is ablated (mean over seeds, and over the controls of a set; 95% t-interval; one "
        "seed and set: its own interval)", "",
        two_by_two(effects).to_markdown(), "",
        "## Dissociation targets (seed means; `met`: the size rules hold and the circuit's mean lies beyond its "
        "type-matched controls' interval)", "",
        targets(effects).to_markdown(index=False, floatfmt=".3f"), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="circuit_dissociation")

if __name__ == "__main__":
    sys.exit(main())
