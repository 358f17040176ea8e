"""``python -m tsds_interp.probe``: the command line of :mod:`tsds_interp.probe`."""

from __future__ import annotations

import time

from tsds_interp import cli, probe
from tsds_interp.model import checkpoint_config, checkpoint_label, load, resolve_checkpoint
from tsds_interp.plotting import auc_panels
from tsds_interp.probe import MIN_QUESTIONS, probe_study
from tsds_interp.verification import MAX_BOOT, MAX_QUESTIONS, MAX_SAMPLES


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.probe", probe.__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="sft", help="checkpoint folder or shipped name")
    p.add_argument("--cells", default="all", help="cells of the questions: all, or e.g. 1x2,2x1")
    p.add_argument("--train-questions", type=cli.integer(MIN_QUESTIONS, MAX_QUESTIONS), default=4096)
    p.add_argument("--test-questions", type=cli.integer(MIN_QUESTIONS, MAX_QUESTIONS), default=2048)
    p.add_argument("--samples", type=cli.integer(1, MAX_SAMPLES), default=8, help="own samples drawn per question")
    p.add_argument("--temperature", type=cli.real(0, 100, lo_open=True), default=1.0)
    p.add_argument("--bootstrap", type=cli.integer(10, MAX_BOOT), default=1000)
    p.add_argument("--seed", type=cli.SEED, default=0)
    cli.add_output(p, "runs/probe")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--quiet", action="store_true")
    return p


def _probe(args, results: cli.Results) -> int:
    task = checkpoint_config(args.checkpoint).task
    if args.cells != "all":
        task.in_distribution(args.cells)
    path = resolve_checkpoint(args.checkpoint)
    model = load(path, device=args.device)
    t0 = time.time()
    df = probe_study(model, args.cells, args.train_questions, args.test_questions, args.samples,
                     args.temperature, args.seed, args.bootstrap, args.quiet)
    out = args.out
    df.to_csv(out / "probe.csv", index=False)
    part = df[df.cell == "all"]
    resid = df[df.site.str.startswith("resid")].assign(layer=lambda d: d.site.str.split().str[1].astype(int))
    auc_panels(resid, "layer", "position", out / "probe_resid.png",
               f"{checkpoint_label(path)}: probe within-question AUC on held-out questions, residual stream "
               "(n = questions with a wrong sample)", control="prompt_end")
    heads = df[~df.site.str.startswith("resid") & (df.position == "decision")].assign(
        layer=lambda d: d.site.str.extract(r"L(\d+)")[0].astype(int), head=lambda d: d.site.str.extract(r"H(\d+)")[0])
    auc_panels(heads, "layer", "head", out / "probe_heads.png",
               f"{checkpoint_label(path)}: probe within-question AUC of each head's output at the decision "
               "position (n = questions with a wrong sample)")
    show = part.sort_values("probe_auc", ascending=False).head(12)
    print(f"probes of {path}, {time.time() - t0:.1f}s; held-out within-question AUC (all cells), best 12:")
    print(show[["site", "position", "probe_auc", "lo", "hi", "n", "readout_auc", "cos_readout"]].to_string(
        index=False, float_format=lambda x: f"{x:.3f}"))
    results.record(checkpoint_path=str(path))
    print(f"\nwrote {out}/probe.csv, probe_resid.png, probe_heads.png, run.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _probe, argv, tool="probe")
