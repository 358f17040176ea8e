"""``python -m tsds_interp.verify``: does a model's decision check the candidate?

Teacher-forces the true product and the model's own wrong samples for the same held-out
questions and compares the decision (within-question paired AUC, logit gap, between-question
AUC, the accept gap split into difficulty and within-question parts, decision rates by attempt,
greedy / sampled accuracy and slip share). Writes ``verification.csv`` (tidy, 95% intervals),
``verification.png`` and ``run.json`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import sys
import time

import pandas as pd

from tsds_interp import cli
from tsds_interp.model import checkpoint_config, checkpoint_label, load, resolve_checkpoint
from tsds_interp.plotting import verification_plot
from tsds_interp.verification import MAX_BOOT, MAX_QUESTIONS, MAX_SAMPLES, verification_metrics

SUMMARY = ("greedy_accuracy", "sample_accuracy", "slip_share", "within_auc@1", "within_auc@2",
           "between_auc", "own_logprob_auc",
           "corruption_auc", "logit_gap@1", "accept_gap", "accept_gap_difficulty", "accept_gap_within",
           "p_d_given_c@1", "p_d_given_w@1")
STEP_SUMMARY = ("greedy_accuracy", "sample_accuracy", "slip_share", "within_auc@1", "logit_gap@1", "e_plus@1",
                "e_minus@1", "own_logprob_auc", "corruption_auc", "episode_accuracy",
                "episode_accuracy_no_reflection", "reflection_gain")


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.verify", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="rl", help="checkpoint folder or shipped name")
    p.add_argument("--questions", type=cli.integer(1, MAX_QUESTIONS), default=2400,
                   help="held-out questions, spread over the cells")
    p.add_argument("--samples", type=cli.integer(1, MAX_SAMPLES), default=8, help="sampled first attempts per question")
    p.add_argument("--temperature", type=cli.real(0, 100, lo_open=True), default=1.0,
                   help="sampling temperature of candidates")
    p.add_argument("--cells", default=None, help="comma-separated cells, e.g. 2x3,3x2 (default: all in-distribution)")
    p.add_argument("--bootstrap", type=cli.integer(10, MAX_BOOT), default=1000,
                   help="bootstrap resamples for the intervals")
    cli.add_output(p, "runs/verify")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--seed", type=cli.SEED, default=0)
    return p


MIN_PAIRED = 30  # questions (states) with a wrong sample below which a within AUC is flagged as noisy


def console_table(df: pd.DataFrame, metrics: tuple[str, ...]) -> str:
    """Pooled (``all``) and ``hard`` values with their 95% intervals and counts, one metric per line;
    a blank where a cell has no data (e.g. no wrong samples) says so."""
    cols = [c for c in ("all", "hard") if c in set(df.cell)]
    rows = []
    for metric in metrics:
        line = {"metric": metric}
        for cell in cols:
            r = df[(df.cell == cell) & (df.metric == metric)]
            if r.empty or pd.isna(r.value.iloc[0]):
                line[cell] = "— (no data: n=0)" if r.empty or int(r.n.iloc[0]) == 0 else "— (undefined)"
            else:
                v = r.iloc[0]
                line[cell] = f"{v.value:.3f} [{v.lo:.3f}, {v.hi:.3f}] n={int(v.n)}"
        rows.append(line)
    return pd.DataFrame(rows).to_string(index=False)


def small_sample_notes(df: pd.DataFrame, metric: str) -> list[str]:
    """One line per cell whose ``metric`` rests on fewer than ``MIN_PAIRED`` questions or has no data."""
    notes = []
    for r in df[df.metric == metric].itertuples():
        if r.n == 0 or pd.isna(r.value):
            notes.append(f"note: {metric} in {r.cell} is undefined: no question there had a wrong sample")
        elif r.n < MIN_PAIRED:
            notes.append(f"note: {metric} in {r.cell} rests on {int(r.n)} questions (interval {r.lo:.2f}-{r.hi:.2f}); "
                         "raise --questions before reading it")
    return notes


def _verify(args, results: cli.Results) -> int:
    task = checkpoint_config(args.checkpoint).task
    cells = tuple(c.strip() for c in args.cells.split(",")) if args.cells else None
    if cells:
        task.in_distribution(args.cells)
    path = resolve_checkpoint(args.checkpoint)
    model = load(path, device=args.device)
    t0 = time.time()
    df = verification_metrics(model, args.questions, args.samples, args.temperature, args.seed,
                              args.bootstrap, cells)
    elapsed = time.time() - t0
    out = args.out
    df.to_csv(out / "verification.csv", index=False)
    verification_plot(df, out / "verification.png",
                      f"Does the decision verify? {checkpoint_label(path)}: n={args.questions} held-out questions "
                      f"x {args.samples} samples; bars: 95% intervals")
    summary = STEP_SUMMARY if task.steps else SUMMARY
    print(f"verification of {path} on {args.questions} held-out questions x {args.samples} samples, "
          f"{elapsed:.1f}s")
    print(console_table(df, summary))
    notes = small_sample_notes(df, "within_auc@1")
    if notes:
        print("\n" + "\n".join(notes))
    results.record(checkpoint_path=str(path), elapsed_s=elapsed)
    print(f"\nwrote {out}/verification.csv, verification.png, run.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _verify, argv, tool="verify")


if __name__ == "__main__":
    sys.exit(main())
