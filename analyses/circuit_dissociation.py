"""The decision and sampling circuits of SFT and RL models, named by three methods and tested by ablation.

    python analyses/circuit_dissociation.py [--seed-runs runs/new_s0 runs/new_s1 runs/new_s2]
        [--labels sft rl] [--pairs 32] [--questions 256] [--eval-questions 1024] [--samples 64]
        [--k 3] [--margin 0.25] [--out runs/analyses/circuit_dissociation]

Per model: decision pairs (truth vs the model's own wrong sample, cells where its decision separates
them) and sampling pairs; every head and MLP scored by exact activation patching, attribution
patching and mean-ablation during rollouts (:func:`tsds_interp.circuits.node_scores`) and by its
edges; circuits
named by :func:`~tsds_interp.circuits.name_circuits`; then each circuit, its top component, and
random sets of the same sizes mean-ablated on held-out questions
(:func:`~tsds_interp.circuits.dissociation`).
Edge attribution (integrated gradients) of every edge is a fourth vote and is drawn as a pruned
graph per model and function. Writes ``node_scores.csv``, ``edges.csv``, ``graph_*.png``,
``circuits.csv``, ``dissociation.csv``, ``dissociation.png`` and
``summary.md`` (the 2 x 2 table: circuit ablated x what it changes, mean over seeds, 95% t-interval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from _common import checkpoint_groups, fmt, over_seeds  # noqa: E402

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

EFFECTS = ("within_auc", "logit_gap", "logit_gap_share", "greedy_accuracy", "sample_accuracy")


def study(ckpt: str, args) -> tuple[pd.DataFrame, dict, pd.DataFrame, pd.DataFrame]:
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
                           seed=args.seed + 1, controls=args.controls)
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


def two_by_two(effects: pd.DataFrame) -> pd.DataFrame:
    """Rows: model x ablated set; columns: each effect as mean [95% interval] over seeds."""
    effects = with_gap_share(effects)
    eff = effects[effects.ablated != "none"].assign(
        ablated=lambda d: d.ablated.str.replace(r" \(control \d+\)", "", regex=True).str.replace(
            r"random (\d+)", r"random \1 (control)", regex=True))
    if eff.seed.nunique() > 1:
        agg = over_seeds(eff, "delta", keys=("label", "ablated", "metric"))
    else:
        agg = eff.rename(columns={"delta": "mean"}).assign(seeds=1)
    agg["cell"] = [fmt(m, lo, hi) for m, lo, hi in agg[["mean", "lo", "hi"]].to_numpy()]
    return agg.pivot_table(index=["label", "ablated"], columns="metric", values="cell", aggfunc="first",
                           sort=False)[list(EFFECTS)]


def figure(effects: pd.DataFrame, path: Path) -> None:
    eff = effects[effects.ablated.str.startswith(("decision", "sampling"))]
    eff = with_gap_share(eff)
    fig, axes = plt.subplots(1, len(EFFECTS), figsize=(4 * len(EFFECTS), 3.4))
    for ax, metric in zip(axes, EFFECTS):
        part = eff[eff.metric == metric]
        for i, (key, g) in enumerate(part.groupby(["label", "ablated"], sort=False)):
            x = i + 0.08 * (g.seed.to_numpy() - g.seed.mean())
            ax.errorbar(x, g.delta, yerr=[g.delta - g.lo, g.hi - g.delta], fmt="o", capsize=2,
                        color="C0" if key[1].startswith("decision") else "C1",
                        marker="o" if key[1].endswith("circuit") else "s")
        ax.set_xticks(range(part.groupby(["label", "ablated"]).ngroups),
                      [f"{a}\n{b.replace(' component', '').replace(' circuit', '')}"
                       for a, b in part.groupby(["label", "ablated"], sort=False).groups],
                      fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"change in {metric}")
    fig.suptitle("Mean-ablating each circuit (blue: decision, orange: sampling; circles: circuit, squares: its top "
                 "component); one point per seed, 95% intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    p.add_argument("--controls", type=cli.integer(1), default=2, help="random component sets per size")
    p.add_argument("--graph-edges", type=cli.integer(1), default=12, help="edges drawn per circuit graph")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--out", type=cli.out_dir, default="runs/analyses/circuit_dissociation",
                   help="output folder; per-model results are kept in OUT/parts, so a rerun resumes")
    return p


def _run(args, argv=None) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_scores, infos, all_effects, all_edges = [], [], [], []
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    for label, ckpts in checkpoint_groups(args.labels, args.seed_runs).items():
        for seed, ckpt in enumerate(ckpts):
            tag = dict(label=label, seed=seed, checkpoint=ckpt)
            stem = parts / f"{label}_s{seed}"
            if not (done := Path(f"{stem}.json")).is_file():  # each model's results are kept: a rerun resumes
                scores, info, effects, edges = study(ckpt, args)
                scores.to_csv(f"{stem}_scores.csv", index=False)
                effects.to_csv(f"{stem}_effects.csv", index=False)
                edges.to_csv(f"{stem}_edges.csv", index=False)
                done.write_text(json.dumps(info))
                for function, part in edges.groupby("function"):
                    draw_graph(prune(part, args.graph_edges), load(ckpt), out / f"graph_{label}_s{seed}_{function}.png",
                               f"{label} seed {seed}: top {args.graph_edges} {function} edges (IG edge attribution)")
            info = json.loads(done.read_text())
            all_scores.append(pd.read_csv(f"{stem}_scores.csv").assign(**tag))
            all_effects.append(pd.read_csv(f"{stem}_effects.csv", keep_default_na=False, na_values=[""]).assign(**tag))
            all_edges.append(pd.read_csv(f"{stem}_edges.csv").assign(**tag))
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
    figure(effects, out / "dissociation.png")
    base = effects[effects.ablated == "none"].pivot_table(index=["label", "seed"], columns="metric", values="value")
    text = "\n".join([
        "# Decision and sampling circuits: named by three methods, tested by ablation", "",
        "Command: `python analyses/circuit_dissociation.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        "## Circuits per model", "", circuits.drop(columns="checkpoint").to_markdown(index=False, floatfmt=".3f"), "",
        "## Top 5 edges per model and function (edge attribution, 5 integrated-gradient steps)", "",
        top_edges.to_markdown(index=False, floatfmt=".3f"), "",
        "## Unablated models (deciding cells for within_auc / logit_gap, all cells for accuracies)", "",
        base.to_markdown(floatfmt=".3f"), "",
        "## Change when a circuit is mean-ablated (mean over seeds, 95% t-interval; one seed: its own interval)", "",
        two_by_two(effects).to_markdown(), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args: _run(args, argv), argv)

if __name__ == "__main__":
    sys.exit(main())
