"""The DS toy model trained from (0.2, 1.5, 1.0) under the surrogate reward and under a KL penalty.

    python analyses/ds_toy_model.py [--steps 10000] [--lr 0.1] [--beta 0.1] [--out runs/analyses/ds_toy_model]

Writes ``toy_runs.csv`` (every step of both runs), ``stage_gradients.csv`` (mean |gradient| per
stage), ``ds_toy_model.png`` (six panels) and ``summary.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from tsds_interp import cli
from tsds_interp.theory import OBJECTIVES, PAPER_INIT, Toy, simulate, stage_gradient_means  # noqa: E402

STYLE = {"surrogate": "-", "kl_penalty": "--"}
COLORS = {"s": "#4c72b0", "dC": "#55a868", "dW": "#c44e52"}


def figure(runs: pd.DataFrame, means: pd.DataFrame, path: Path, args) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    for objective, run in runs.groupby("objective", sort=False):
        for k in ("s", "dC", "dW"):
            ax.plot(run.step, run[f"theta_{k}"], STYLE[objective], color=COLORS[k], label=f"theta_{k} ({objective})")
    ax.set(title="parameters", xlabel="step")
    ax.legend(fontsize=7)
    for ax, objective in zip((axes[0, 1], axes[0, 2]), OBJECTIVES):
        run = runs[runs.objective == objective]
        for k in ("s", "dC", "dW"):
            ax.plot(run.step, run[f"gJ_{k}"], color=COLORS[k], label=f"reward grad {k}")
            if objective == "kl_penalty":
                ax.plot(run.step, run[f"gKL_{k}"], ":", color=COLORS[k], label=f"KL-term grad {k}")
        ax.set(title=f"gradients under {objective}", xlabel="step", xscale="symlog")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    for objective, run in runs.groupby("objective", sort=False):
        for k, name in (("s", "p_s"), ("dC", "p_d_given_c"), ("dW", "p_d_given_w")):
            ax.plot(run.step, run[name], STYLE[objective], color=COLORS[k], label=f"{name} ({objective})")
    ax.set(title="probabilities", xlabel="step", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for objective, run in runs.groupby("objective", sort=False):
        ax.plot(run.step, run.J, STYLE[objective], color="k", label=f"expected reward ({objective})")
        ax.plot(run.step, run.D, STYLE[objective], color="tab:purple", label=f"KL to init ({objective})")
    ax.set(title="reward and KL", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    long = means.melt(id_vars=["objective", "gradient"], value_vars=["sample", "decision"], var_name="stage",
                      value_name="mean |gradient|")
    long["which"] = long.objective + ": " + long.gradient
    sns.barplot(long, x="which", y="mean |gradient|", hue="stage", ax=ax, palette=["#4c72b0", "#dd8452"])
    ax.set(title="mean |gradient| by stage (linear scale: bar lengths compare)", xlabel="")
    ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle(f"DS toy model, exact gradients (no sampling, so no intervals): {args.steps} steps, lr {args.lr}, "
                 f"KL weight beta {args.beta}; solid vs dashed: the objectives", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(runs: pd.DataFrame, means: pd.DataFrame, args) -> str:
    last = runs.groupby("objective", sort=False).tail(1).set_index("objective")
    cols = ["p_s", "p_d_given_c", "p_d_given_w", "J", "D"]
    return "\n".join([
        "# DS toy model",
        "",
        f"Command: `python analyses/ds_toy_model.py --steps {args.steps} --lr {args.lr} --beta {args.beta} "
        f"--budget {args.budget} --sample-tokens {args.sample_tokens}`",
        "",
        f"Start (theta_s, theta_dC, theta_dW) = {PAPER_INIT}; exact gradients; gradient ascent.",
        "",
        "## Final state",
        "",
        last[cols].to_markdown(floatfmt=".4f"),
        "",
        "## Mean |gradient| over the run, by stage (sample: |g_s|; decision: ||(g_dC, g_dW)||)",
        "",
        means.to_markdown(index=False, floatfmt=".4g"),
        "",
    ])


def _parser() -> cli.Parser:
    p = cli.Parser("python analyses/ds_toy_model.py", __doc__.split("\n\n")[0])
    p.add_argument("--steps", type=cli.integer(1), default=10_000)
    p.add_argument("--lr", type=cli.real(0, 10, lo_open=True), default=0.1)
    p.add_argument("--beta", type=cli.real(0, 1000), default=0.1, help="KL coefficient")
    p.add_argument("--budget", type=cli.integer(1), default=3, help="attempt budget K")
    p.add_argument("--sample-tokens", type=cli.integer(1), default=6, help="tokens per candidate carrying the KL")
    cli.add_output(p, "runs/analyses/ds_toy_model")
    return p


def _run(args, argv=None) -> int:
    try:
        toy = Toy(budget=args.budget, sample_tokens=args.sample_tokens)
        if args.steps < 1 or args.lr <= 0 or args.beta < 0:
            raise ValueError("--steps must be >= 1, --lr > 0 and --beta >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = pd.concat([simulate(o, steps=args.steps, lr=args.lr, beta=args.beta, toy=toy, progress=True)
                      for o in OBJECTIVES], ignore_index=True)
    means = stage_gradient_means(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "toy_runs.csv", index=False)
    means.to_csv(out / "stage_gradients.csv", index=False)
    figure(runs, means, out / "ds_toy_model.png", args)
    text = summary(runs, means, args)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out}/toy_runs.csv, stage_gradients.csv, ds_toy_model.png, summary.md")
    return 0


def main(argv=None) -> int:
    return cli.main(_parser(), lambda args, _: _run(args, argv), argv, tool="ds_toy_model")

if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())
