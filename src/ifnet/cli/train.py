"""`ifnet train --config configs/iu_xray.yaml [--set key=value ...] --out runs/NAME [--resume]`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from ifnet.cli import add_config_arguments
from ifnet.errors import IFNetError, UsageError

HELP = "train IFNet from a YAML config"

#: settings a resumed run may change: where it runs and where its data now lies, and how it goes on training and
#: validating (every optim.* and eval.* setting but the monitor that chose `best` so far; changing them gives up
#: the exact continuation, which is the user's call). The model, the data and its preprocessing, the seed and
#: the monitor must stay: the checkpoint was trained with them.
RESUME_MAY_CHANGE = ("device", "deterministic", "data.annotation", "data.image_root", "data.num_workers",
                     "data.val_limit", "optim.*", "eval.*")
RESUME_MUST_KEEP = ("eval.monitor",)


def may_change_on_resume(key: str) -> bool:
    if key in RESUME_MUST_KEEP:
        return False
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_MAY_CHANGE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (e.g. configs/iu_xray.yaml); defaults apply without one. With "
                                 "--resume and no --config: the run's own config.json")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, resolved config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its `last` checkpoint, with the run's config.json "
                             "(--set may change only " + ", ".join(RESUME_MAY_CHANGE) + " but eval.monitor)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if --out already holds a run")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def resume_conflict(saved: dict, given: dict, may_change: Callable[[str], bool] = may_change_on_resume) -> str | None:
    """The first setting that ``may_change`` refuses (default: outside :data:`RESUME_MAY_CHANGE`) where ``given``
    (the resolved config of this command) differs from ``saved`` (the run's config.json, resolved), as "key is A
    in the run, B here"; else None."""
    old, new = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(given)))
    for key in sorted(set(old) | set(new)):
        if not may_change(key) and old.get(key) != new.get(key):
            return f"{key} is {old.get(key)!r} in the run, {new.get(key)!r} here"
    return None


def _epochs_done(last: Path) -> Optional[int]:
    """The epoch the ``last`` checkpoint was saved after (None if its metadata does not say)."""
    from ifnet.models.checkpoint import read_meta

    epoch = read_meta(last).get("metadata", {}).get("epoch")
    return int(epoch) if isinstance(epoch, int) else None


def _remove_new_run(out: Path, existed: bool) -> None:
    """Undo a run that failed before its first checkpoint: the folder it made, or what it wrote into the
    empty folder it was given, so that the same command can simply be run again."""
    from ifnet.io_utils import remove_path

    for path in [out] if not existed else list(out.iterdir()):
        remove_path(path, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from ifnet.config import resolve, to_dict
    from ifnet.models.checkpoint import interrupted_save
    from ifnet.train import distributed
    from ifnet.train.config import TrainConfig, with_absolute_paths
    from ifnet.io_utils import existing_entries, remove_path
    from ifnet.train.trainer import BEST, LAST, RUN_ENTRIES, Trainer

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    saved = out / "config.json"
    has_run = (out / LAST).exists() or saved.exists()
    if args.resume and not (out / LAST).exists() and not interrupted_save(out / LAST):
        raise UsageError(f"--resume: {out / LAST} not found (nothing to resume)")
    if has_run and not args.resume and not args.overwrite:
        raise IFNetError(f"{out}: already holds a run; use --resume to continue it or --overwrite to start afresh")
    taken = existing_entries(out, RUN_ENTRIES)
    if taken and not args.resume and not args.overwrite:
        raise IFNetError(f"{out}: holds {', '.join(taken)}, which a run would overwrite; choose another --out, "
                         "or pass --overwrite to replace them")
    # JSON is YAML; a run saved before paths were stored absolute is compared as if they were
    run_cfg = with_absolute_paths(resolve(TrainConfig, saved)) if args.resume and saved.exists() else None
    # with --resume and no --config: the run's own config, then --set; paths absolute, as the run stores them
    cfg = with_absolute_paths(resolve(TrainConfig, saved if run_cfg is not None and args.config is None else args.config,
                                      args.overrides))
    if run_cfg is not None:
        conflict = resume_conflict(to_dict(run_cfg), to_dict(cfg))
        if conflict:
            raise UsageError(f"--resume: {saved}: {conflict}; the checkpoint was trained with the run's config "
                             f"(leave out --config to use it; --set may change only "
                             f"{', '.join(RESUME_MAY_CHANGE)} but eval.monitor)")
    if args.resume and "RANK" not in os.environ:  # (under torchrun the trainer recovers and ranks agree)
        from ifnet.models.checkpoint import recover_checkpoint

        for name in (LAST, BEST):  # a save a kill interrupted is put back first, as the trainer would
            recover_checkpoint(out / name)
        done = _epochs_done(out / LAST) if (out / LAST).exists() else None
        if done is not None and done >= cfg.optim.epochs:  # nothing to do: say so before caching any features
            print(f"{out}: the run is complete ({done}/{cfg.optim.epochs} epochs); nothing to resume. Raise "
                  f"optim.epochs (--set optim.epochs={done + 10}) to train further")
            return 0
    # A fresh run into a new or empty folder that fails before its first checkpoint leaves nothing behind.
    existed = out.exists()
    fresh = not args.resume and (not existed or not any(out.iterdir()))
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=args.resume)  # checks the data and builds the model; writes nothing
        if args.overwrite and not args.resume and taken and trainer.is_main:
            for name in taken:  # the old run's files (TensorBoard events included), not the user's others
                remove_path(out / name)
        result = trainer.fit()
    except BaseException:
        main_rank = trainer.is_main if trainer is not None else os.environ.get("RANK", "0") == "0"
        if fresh and main_rank and out.exists() and not (out / LAST).exists() and not interrupted_save(out / LAST):
            _remove_new_run(out, existed)
        raise
    finally:
        if trainer is not None:
            distributed.cleanup(trainer.dist)
    if trainer.is_main:
        print(f"best epoch {result.best_epoch}: val {cfg.eval.monitor} {result.best_score:.4f}; "
              f"checkpoints in {out / 'best'} and {out / LAST}")
    return 0
