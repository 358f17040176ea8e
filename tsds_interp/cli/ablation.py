"""``python -m tsds_interp.ablation``: the command line of :mod:`tsds_interp.ablation`."""

from __future__ import annotations

from tsds_interp import ablation, cli
from tsds_interp.ablation import MAX_QUESTIONS, MODES, SCORED, ablation_sweep
from tsds_interp.model import autocast, checkpoint_config, checkpoint_label, load, resolve_checkpoint
from tsds_interp.plotting import heatmap


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.ablation", ablation.__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="rl", help="checkpoint folder or shipped name")
    p.add_argument("--mode", default="zero", choices=MODES)
    p.add_argument("--questions", type=cli.integer(1, MAX_QUESTIONS), default=256)
    p.add_argument("--threshold", type=cli.real(0, 1), default=0.05,
                   help="smallest |change| of a metric that labels a component")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--device", type=cli.device, default="cpu")
    cli.add_output(p, "runs/ablation")
    p.add_argument("--max-batch", type=cli.integer(1, 2**20), default=2048,
                   help="episodes decoded at once (memory bound)")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none", help="bfloat16 autocast")
    p.add_argument("--quiet", action="store_true")
    return p


def _ablate(args, results: cli.Results) -> int:
    checkpoint_config(args.checkpoint)
    path = resolve_checkpoint(args.checkpoint)
    model = load(path, device=args.device)
    with autocast(args.device, args.autocast):
        df = ablation_sweep(model, args.questions, args.mode, args.seed, threshold=args.threshold,
                            quiet=args.quiet, max_batch=args.max_batch)
    out = args.out
    results.record(checkpoint_path=str(path))
    df.to_csv(out / "ablation.csv", index=False)
    for metric in SCORED:
        part = df[df.metric == metric].assign(head=lambda d: d["head"].map(lambda h: "mlp" if h < 0 else f"H{h}"))
        base = float(part["baseline"].iloc[0]) if "baseline" in part and len(part) else float("nan")
        heatmap(part, "layer", "head", out / f"ablation_{args.mode}_{metric}.png",
                f"{checkpoint_label(path)}: {args.mode} ablation, change in {metric} "
                f"(baseline {base:.3f}, n={args.questions} questions)\n95% intervals of each change in ablation.csv",
                value="delta", label=f"change in {metric}")
    wide = df.pivot_table(index=["component", "label"], columns="metric", values="delta", sort=False)
    print(f"{args.mode} ablation of {args.checkpoint}, {args.questions} questions: change vs baseline")
    print(wide[list(SCORED)].round(3).to_string())
    print(f"\nwrote {out}/ablation.csv, heatmaps and run.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _ablate, argv, tool="ablation")
