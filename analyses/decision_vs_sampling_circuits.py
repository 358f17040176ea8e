"""Decision and sampling components of the SFT and RL models by three methods, side by side.

    python analyses/decision_vs_sampling_circuits.py [--checkpoints sft rl] [--pairs 32]
                                                      [--questions 256] [--top 3] [--out DIR]

Per model and head/MLP: exact activation patching and attribution patching (head and layer
granularity, decision and sampling pairs, denoising) and zero-ablation during rollouts (change in
p_s, p_{d|C}, p_{d|W}). Writes ``components.csv``, ``overlap.csv`` (top-k agreement between
methods), ``circuits.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from tsds_interp.ablation import ablation_sweep  # noqa: E402
from tsds_interp.model import load  # noqa: E402
from tsds_interp.patch import run_patching  # noqa: E402


def component_scores(model, pairs: int, questions: int, seed: int = 0) -> pd.DataFrame:
    """One row per component (L{l}H{h} or L{l}.mlp) with every method's score."""
    rows = {}
    for function, method, gran in itertools.product(("decision", "sampling"), ("activation", "attribution"),
                                                     ("head", "layer")):
        df = run_patching(model, function, method, gran, pairs, seed)
        if gran == "layer":
            df = df[df.grid == "mlp_out"].groupby("layer", as_index=False)["value"].sum()
            df["component"] = [f"L{x}.mlp" for x in df.layer]
        else:
            df["component"] = [f"L{a}H{b}" for a, b in zip(df.layer, df["head"])]
        for comp, v in zip(df.component, df.value):
            rows.setdefault(comp, {})[f"{method}_{function}"] = float(v)
    abl = ablation_sweep(model, questions, "zero", seed, quiet=True)
    for comp, part in abl.groupby("component"):
        d = part.set_index("metric")["delta"]
        rows.setdefault(comp, {}).update(ablation_sampling=float(d["p_s"]), ablation_decision=float(
            max(d[["p_d_given_c", "p_d_given_w"]].abs())), ablation_label=part["label"].iloc[0],
            ablation_d_p_dW=float(d["p_d_given_w"]), ablation_d_p_dC=float(d["p_d_given_c"]))
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis("component").reset_index()
    out["layer"] = out.component.str.extract(r"L(\d+)").astype(int)
    out["head"] = out.component.str.extract(r"H(\d+)")[0].fillna("mlp")
    return out


def overlap(scores: pd.DataFrame, k: int) -> pd.DataFrame:
    rows = []
    for (model, function), part in scores.groupby(["model", "function"], sort=False):
        tops = {m: set(part.reindex(part[f"{m}_{function}"].abs().sort_values(ascending=False).index)
                       .component.head(k)) for m in ("activation", "attribution", "ablation")}
        for a, b in itertools.combinations(tops, 2):
            shared = tops[a] & tops[b]
            rows.append(dict(model=model, function=function, methods=f"{a} & {b}", shared=len(shared), k=k,
                             jaccard=len(shared) / len(tops[a] | tops[b]),
                             corr=part[f"{a}_{function}"].corr(part[f"{b}_{function}"])))
    return pd.DataFrame(rows)


def figure(scores: pd.DataFrame, path: Path) -> None:
    models = list(dict.fromkeys(scores.model))
    cols = [f"{m}_{f}" for f in ("decision", "sampling") for m in ("activation", "attribution", "ablation")]
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.1 * len(cols), 2.9 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        part = scores[scores.model == model]
        for j, col in enumerate(cols):
            table = part.pivot(index="layer", columns="head", values=col)
            lim = float(table.abs().max().max()) or 1.0
            sns.heatmap(table, ax=axes[i, j], cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, annot=True,
                        fmt=".2f", cbar=False, annot_kws={"size": 6})
            axes[i, j].set_title(f"{model}: {col}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["sft", "rl"])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--questions", type=int, default=256, help="rollout questions per ablation")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/analyses/decision_vs_sampling_circuits")
    args = p.parse_args(argv)
    scores = pd.concat([component_scores(load(c), args.pairs, args.questions, args.seed).assign(model=c)
                        for c in args.checkpoints], ignore_index=True)
    long = pd.concat([scores.assign(function=f) for f in ("decision", "sampling")])
    ov = overlap(long, args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "components.csv", index=False)
    ov.to_csv(out / "overlap.csv", index=False)
    figure(scores, out / "circuits.png")
    show = ["model", "component", "activation_decision", "attribution_decision", "ablation_d_p_dW",
            "ablation_d_p_dC", "activation_sampling", "attribution_sampling", "ablation_sampling", "ablation_label"]
    text = "\n".join([
        "# Decision vs sampling components", "",
        "Command: `python analyses/decision_vs_sampling_circuits.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        f"Patching: {args.pairs} pairs per function, normalized (0 = corrupted, 1 = clean); ablation: zero, "
        f"{args.questions} held-out questions, change in each DS metric.", "",
        scores[show].to_markdown(index=False, floatfmt=".3f"), "",
        f"## Agreement of the top {args.top} components between methods", "",
        ov.to_markdown(index=False, floatfmt=".2f"), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
