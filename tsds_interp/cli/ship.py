"""``python -m tsds_interp.ship``: the command line of :mod:`tsds_interp.ship`."""

from __future__ import annotations

import json

from tsds_interp import cli
from tsds_interp import ship as ship_module
from tsds_interp.ship import ship


def _parser() -> cli.Parser:
    p = cli.Parser("python -m tsds_interp.ship", ship_module.__doc__.split("\n\n")[0])
    p.add_argument("stage_dir", help="a training stage folder (holds checkpoint/ and run.json)")
    p.add_argument("name", help="shipped name, e.g. base, sft, rl, sft_balanced")
    p.add_argument("--command", required=True, help="the command that trained the stage, for the manifest")
    p.add_argument("--force", action="store_true", help="replace a shipped checkpoint of the same name")
    return p


def _ship(args) -> int:
    entry = ship(args.stage_dir, args.name, args.command, force=args.force)
    print(json.dumps({args.name: entry}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(_parser(), _ship, argv)
