"""``python -m tsds_interp.bench``: the command line of :mod:`tsds_interp.bench`."""

from __future__ import annotations

import argparse
import json

import torch

from tsds_interp import bench, cli
from tsds_interp.bench import ENTRIES


def _entry(name: str) -> str:
    if name not in ENTRIES:
        raise argparse.ArgumentTypeError(f"unknown entry {name!r}; choose from {', '.join(ENTRIES)}")
    return name


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.bench", bench.__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="*", default=list(ENTRIES), type=_entry, metavar="ENTRY",
                   help=f"any of {', '.join(ENTRIES)}")
    p.add_argument("--json", type=cli.out_file, help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    return p


def _bench(args) -> int:
    torch.manual_seed(0)
    results = {}
    for entry in args.entries:
        results[entry] = ENTRIES[entry](args.quick)
        for name, r in results[entry].items():
            print(f"{entry}.{name:<12} ours {r['ours_s']:.4f}s  reference {r['reference_s']:.4f}s  "
                  f"ratio {r['ratio']:.2f}  ({r['reference']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _bench, argv)
