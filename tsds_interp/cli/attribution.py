"""``python -m tsds_interp.attribution``: the command line of :mod:`tsds_interp.gradient_split`."""

from __future__ import annotations

import torch

from tsds_interp import cli
from tsds_interp.gradient_split import MAX_QUESTIONS, attribute_all, default_batches, head_decision_share, summarize
from tsds_interp.model import (
    CheckpointError,
    checkpoint_config,
    checkpoint_label,
    load,
    resolve_checkpoint,
    shipped_names,
)
from tsds_interp.plotting import gradient_mass_bars, head_share_heatmap

# ---------------------------------------------------------------- CLI

_PREVIOUS_STAGE = {"rl": "sft", "sft": "base", "sft_balanced": "base"}


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.attribution", "Split each objective's gradient by token role.")
    p.add_argument("--checkpoint", default="rl", help="checkpoint folder or shipped name")
    p.add_argument("--ref", help="reference model of the KL penalty (default for shipped names: the "
                                 "stage before; for folders: none, and KL is skipped)")
    p.add_argument("--questions", type=cli.integer(1, MAX_QUESTIONS), default=64, help="training questions per batch")
    p.add_argument("--group", type=cli.integer(2, 1024), default=8,
                   help="rollouts per question (advantages are within groups)")
    p.add_argument("--decision-share", type=cli.real(0, 1), default=0.5, help="for sft_role_balanced")
    p.add_argument("--kl-estimator", choices=("k1", "k3"), default="k3")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--device", type=cli.device, default="cpu")
    cli.add_output(p, "runs/attribution", "folder for CSV, PNG and run.json")
    return p


def _attribute(args, results: cli.Results) -> int:
    model_cfg = checkpoint_config(args.checkpoint)
    ref_name = args.ref or (_PREVIOUS_STAGE.get(args.checkpoint) if args.checkpoint in shipped_names() else None)
    if ref_name is not None:
        try:
            ref_cfg = checkpoint_config(ref_name)
        except CheckpointError as e:
            raise CheckpointError(f"--ref: {e}") from None
        if ref_cfg.task != model_cfg.task:
            raise ValueError(f"--ref {ref_name} was trained on another task than --checkpoint "
                             f"{args.checkpoint}; pass a reference of the same task")
    model = load(args.checkpoint, device=args.device)
    ref = load(ref_name, device=args.device) if ref_name else None
    torch.manual_seed(args.seed)
    batches = default_batches(model, args.questions, args.group, args.seed)
    df = attribute_all(model, batches, ref=ref, decision_share=args.decision_share,
                       kl_estimator=args.kl_estimator)
    table = summarize(df)
    out = args.out
    df.to_csv(out / "attribution.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    name = checkpoint_label(resolve_checkpoint(args.checkpoint))
    size = f"n={args.questions} questions x {args.group} rollouts"
    gradient_mass_bars(table, out / "gradient_mass.png", f"{name}: gradient mass by role ({size})")
    head_share_heatmap(head_decision_share(df), out / "head_decision_share.png",
                       f"{name}: decision share |g_d| / (|g_s| + |g_d|) per head ({size})")
    results.record(checkpoint_path=str(resolve_checkpoint(args.checkpoint)), ref=ref_name)
    if ref is None:
        print("note: no reference model, KL skipped (pass --ref CHECKPOINT)")
    cols = ["objective", "source", "norm_sample", "norm_decision", "ratio_decision_to_sample", "cosine",
            "decision_mass_share", "decision_token_share", "imbalance_index"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}/attribution.csv, summary.csv, gradient_mass.png, head_decision_share.png, run.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _attribute, argv, tool="attribution")
