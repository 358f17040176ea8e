"""``python -m tsds_interp.train``: the command line of :mod:`tsds_interp.train`."""

from __future__ import annotations

import argparse
import dataclasses

from tsds_interp import cli, distributed, train
from tsds_interp.checkpointing import Interrupted, check_stage_folder
from tsds_interp.model import CheckpointError, checkpoint_config
from tsds_interp.presets import PRESETS, STAGES, TrainConfig, preset_config
from tsds_interp.train import pipeline, train_stage


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser("python -m tsds_interp.train", train.__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=(*STAGES, "pipeline"))
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--out", required=True, type=cli.stage_dir, help="stage folder (pipeline: parent of base/sft/rl)")
    p.add_argument("--init", help="checkpoint to start sft/rl from (folder or shipped name)")
    p.add_argument("--ref", help="reference model for the RL KL penalty (default: --init)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None
                       else str, default=None, help=f"(preset value; dataclass default {f.default})")
    return p


def _train(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "stage" and getattr(args, f.name) is not None}
    if args.stage == "pipeline":
        for stage in STAGES:
            preset_config(args.preset, stage, **overrides)
    else:
        cfg = preset_config(args.preset, args.stage, **overrides)
        if cfg.stage != "pretrain" and args.init is None:
            raise ValueError(f"the {cfg.stage} stage starts from a model: pass --init CHECKPOINT")
        for flag, name in (("--init", args.init), ("--ref", args.ref)):
            if name is not None:
                try:
                    checkpoint_config(name)
                except CheckpointError as e:
                    raise CheckpointError(f"{flag}: {e}") from None
        check_stage_folder(args.out, args.resume)
    try:
        if args.stage == "pipeline":
            paths = pipeline(args.preset, args.out, quiet=args.quiet, resume=args.resume, **overrides)
            text = "\n".join(f"{k}: {v}" for k, v in paths.items())
        else:
            ckpt = train_stage(cfg, args.out, init=args.init, ref=args.ref, resume=args.resume, quiet=args.quiet)
            text = f"checkpoint: {ckpt}"
    except Interrupted as e:
        cli.say(str(e))
        return cli.EXIT_INTERRUPTED
    if cli.is_main_process():
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return cli.main(_parser(), _train, argv)
    finally:
        distributed.close()
