"""`ifnet train --config configs/iu_xray.yaml [--set key=value ...] --out runs/NAME [--resume]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ifnet.cli import add_config_arguments
from ifnet.errors import IFNetError, UsageError

HELP = "train IFNet from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (e.g. configs/iu_xray.yaml); defaults apply without one")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, resolved config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its `last` checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if --out already holds a run")


def run(args: argparse.Namespace) -> int:
    from ifnet.config import resolve
    from ifnet.models.checkpoint import interrupted_save
    from ifnet.train import distributed
    from ifnet.train.config import TrainConfig
    from ifnet.train.trainer import LAST, Trainer

    cfg = resolve(TrainConfig, args.config, args.overrides)
    out: Path = args.out
    has_run = (out / LAST).exists() or (out / "config.json").exists()
    if args.resume and not (out / LAST).exists() and not interrupted_save(out / LAST):
        raise UsageError(f"--resume: {out / LAST} not found (nothing to resume)")
    if has_run and not args.resume and not args.overwrite:
        raise IFNetError(f"{out}: already holds a run; use --resume to continue it or --overwrite to start afresh")
    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        result = trainer.fit()
    finally:
        distributed.cleanup(trainer.dist)
    if trainer.is_main:
        print(f"best epoch {result.best_epoch}: val {cfg.eval.monitor} {result.best_score:.4f}; "
              f"checkpoints in {out / 'best'} and {out / LAST}")
    return 0
