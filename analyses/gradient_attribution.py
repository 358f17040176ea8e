"""The Gradient Attribution Property on trained models: every objective's gradient split by role.

    python analyses/gradient_attribution.py [--checkpoints rl:sft sft:base] [--questions 64]
                                            [--seeds 0 1 2] [--out runs/analyses/gradient_attribution]

Each ``MODEL:REF`` pair is a checkpoint (shipped name or folder) and the reference model of its
KL penalty. Objectives: surrogate reward and KL on the model's own rollouts (``questions`` x 8),
SFT token_mean / sequence_mean / role_balanced on reflective SFT data from the model's own
candidates. Several ``--seeds`` draw independent batches (interval = mean +- t sd / sqrt(k)).
Writes ``attribution.csv``, ``imbalance.csv``, ``gradient_mass_<model>.png``,
``head_decision_share_<model>.png`` and ``summary.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import fmt, over_seeds  # noqa: E402

from tsds_interp import cli  # noqa: E402
from tsds_interp.gradient_split import attribute_all, default_batches, head_decision_share, summarize  # noqa: E402
from tsds_interp.model import load  # noqa: E402
from tsds_interp.plotting import gradient_mass_bars, head_share_heatmap  # noqa: E402
from tsds_interp.rollout import progress  # noqa: E402


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/gradient_attribution.py", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["rl:sft", "sft:base"], help="MODEL:REF pairs")
    p.add_argument("--questions", type=cli.integer(1), default=64)
    p.add_argument("--seeds", type=cli.SEED, nargs="+", default=[0, 1, 2])
    cli.add_output(p, "runs/analyses/gradient_attribution")
    return p


def _run(args, argv=None) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames, tables = [], []
    for pair in progress(args.checkpoints, "attribution", "model"):
        name, _, ref_name = pair.partition(":")
        model, ref = load(name), (load(ref_name) if ref_name else None)
        label = Path(name).parent.name if Path(name).exists() else name
        for seed in args.seeds:
            df = attribute_all(model, default_batches(model, args.questions, 8, seed), ref=ref)
            frames.append(df.assign(model=label, seed=seed))
            tables.append(summarize(df).assign(model=label, seed=seed))
        seed0 = frames[-len(args.seeds)]
        size = f"seed {args.seeds[0]}, n={args.questions} questions x 8 rollouts"
        gradient_mass_bars(tables[-len(args.seeds)], out / f"gradient_mass_{label}.png",
                           title=f"{label}: gradient mass by role ({size})")
        head_share_heatmap(head_decision_share(seed0), out / f"head_decision_share_{label}.png",
                           f"{label}: decision share |g_d| / (|g_s| + |g_d|) per head ({size})")
    df, table = pd.concat(frames, ignore_index=True), pd.concat(tables, ignore_index=True)
    df.to_csv(out / "attribution.csv", index=False)
    table.to_csv(out / "imbalance.csv", index=False)
    long = table.melt(id_vars=["model", "objective", "seed"], var_name="metric",
                      value_vars=["imbalance_index", "ratio_decision_to_sample", "cosine", "decision_token_share"])
    agg = over_seeds(long.assign(lo=float("nan"), hi=float("nan")), keys=("model", "objective", "metric"))
    agg["v"] = [fmt(*r) for r in agg[["mean", "lo", "hi"]].values]
    wide = agg.pivot_table(index=["model", "objective"], columns="metric", values="v", aggfunc="first", sort=False)
    text = "\n".join([
        "# Gradient attribution by role", "",
        "Command: `python analyses/gradient_attribution.py " + " ".join(argv or sys.argv[1:]) + "`", "",
        f"Batches: {args.questions} training questions x 8 rollouts (surrogate, KL) and reflective SFT data "
        f"from the model's own candidates (SFT); {len(args.seeds)} independent batches; mean [95% t-interval].",
        "Imbalance index = (|g_d| / (|g_s| + |g_d|)) / (n_d / (n_s + n_d)): 1 = length weighting, "
        "0.5 / token share = even split between sampling and decision.", "",
        wide.to_markdown(), ""])
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="gradient_attribution")

if __name__ == "__main__":
    sys.exit(main())
