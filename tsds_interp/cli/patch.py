"""``python -m tsds_interp.patch``: find the decision and sampling components of a model.

Builds contrast pairs (decision: same question, the true product vs the model's own wrong sample,
from the cells where the decision tells them apart, metric ACCEPT - REJECT logit at the decision
position; sampling: two questions one operand digit apart, metric log-prob of the right answer),
prints each function's clean - corrupted gap with a bootstrap interval, patches every component
with the chosen method and granularity, prints the top components per function and writes
``patching.csv``, one PNG heatmap per function and grid, and ``run.json`` into ``--out``. Effects
are changes of the metric from the base run; normalized scores (0 = corrupted run, 1 = clean run)
are given only where the gap's interval excludes 0.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from tsds_interp import cli
from tsds_interp.edges import draw_graph, prune
from tsds_interp.forward import refusal
from tsds_interp.model import autocast, checkpoint_config, checkpoint_label, load, resolve_checkpoint
from tsds_interp.patching import GRANULARITY_GRIDS, MAX_PAIRS, gap_line, run_patching, top_components
from tsds_interp.plotting import heatmap

# The shipped model whose decision separates its own wrong steps from the truth most (decision gap of
# the default run, 32 own-wrong pairs: steps_sft 0.665 [0.081, 1.483], steps_rl 0.204 [0.008, 0.518],
# one-shot rl 0.054 [0.005, 0.114]).
DEFAULT_CHECKPOINT = "steps_sft"


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plots(df: pd.DataFrame, out: Path, label: str, model) -> list[str]:
    files = []
    for (function, grid), part in df.groupby(["function", "grid"]):
        if grid == "edge":
            path = out / f"{function}_edges.png"
            draw_graph(prune(part.assign(score=part.effect), 12), model, path, f"{function}: top 12 edges {label}")
            files.append(path.name)
            continue
        rows, cols = ("layer", "head") if grid.startswith("head") else ("layer", "pos")
        path = out / f"{function}_{grid}.png"
        note = " (summed over positions)" if grid == "head_pos" else ""
        value = "value" if part.normalized_defined.iloc[0] else "effect"
        kind = "normalized (0 = corrupted, 1 = clean)" if value == "value" else "raw effect (gap not significant)"
        r = part.iloc[0]
        contrast = (f"gap {r.gap:.3f} [{r.gap_lo:.3f}, {r.gap_hi:.3f}], {r.pairs} pairs, "
                    f"cells {r.cells.replace(',', ', ')}")
        heatmap(part, rows, cols, path, f"{function} {grid} {label}{note}\n{contrast}", value=value,
                label=kind)
        files.append(path.name)
    return files


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.patch", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="checkpoint folder or shipped name (default: the shipped model with the strongest "
                        "decision contrast)")
    p.add_argument("--function", default="both", choices=("decision", "sampling", "both"))
    p.add_argument("--method", default="activation", choices=("activation", "attribution"))
    p.add_argument("--granularity", default="head", choices=tuple(GRANULARITY_GRIDS))
    p.add_argument("--direction", default="denoise", choices=("denoise", "noise"))
    p.add_argument("--pairs", type=cli.integer(1, MAX_PAIRS), default=32, help="contrast pairs per function")
    p.add_argument("--cells", default="auto",
                   help="difficulty cells of the pairs: auto (decision: cells where the decision separates "
                        "truth from the model's own wrong samples on screening questions; sampling: all), all, "
                        "or e.g. 1x2,2x1")
    p.add_argument("--ig-steps", type=cli.integer(1, 1000), default=1,
                   help="integrated-gradient steps of attribution patching (1 = plain gradient x difference)")
    p.add_argument("--top", type=cli.integer(1, 10_000), default=8, help="components to print per function")
    cli.add_output(p, "runs/patch")
    p.add_argument("--memory-mb", type=cli.real(0, 1e7, lo_open=True), default=256,
                   help="activation budget of one batch of patched variants (chunks the sweep)")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none", help="bfloat16 autocast")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _patch(args, results: cli.Results) -> int:
    task = checkpoint_config(args.checkpoint).task
    if args.cells not in ("auto", "all"):
        task.in_distribution(args.cells)
    path = resolve_checkpoint(args.checkpoint)
    model = load(path, device=args.device)
    functions = ("decision", "sampling") if args.function == "both" else (args.function,)
    t0 = time.time()
    frames = []
    with autocast(args.device, args.autocast), tqdm(total=len(functions), desc="patching", unit="function",
                                                    disable=args.quiet) as bar:
        for f in functions:
            bar.set_postfix(function=f)
            frames.append(run_patching(model, f, args.method, args.granularity, args.pairs, args.seed,
                                       args.direction, args.memory_mb, args.cells, ig_steps=args.ig_steps))
            bar.update()
    df = pd.concat(frames, ignore_index=True)
    elapsed = time.time() - t0
    out = args.out
    df.to_csv(out / "patching.csv", index=False)
    files = _plots(df, out, f"({args.method}, {checkpoint_label(path)})", model)
    top = top_components(df, args.top)
    print(f"{args.method} patching ({args.direction}) of {path} with {args.pairs} pairs per "
          f"function, {elapsed:.1f}s; effect = change of the metric from the base run; normalized value: "
          "0 = corrupted, 1 = clean")
    for function in functions:
        part = top[top.function == function]
        print("\n" + gap_line(df[df.function == function]))
        print(f"top {function} components:")
        print(part.drop(columns="function").to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    results.record(checkpoint_path=str(path), elapsed_s=elapsed, peak_memory_mb=peak_memory_mb(args.device),
                   fast_path=refusal(model) or "own weights (exact)")
    print(f"\nwrote {out}/patching.csv, {', '.join(files)}, run.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _patch, argv, tool="patch")


if __name__ == "__main__":
    sys.exit(main())
