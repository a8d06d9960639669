"""`ifnet reproduce --config CFG --seeds 3 --out DIR`: train + evaluate per seed, then mean +- std.

Each seed trains a full run (model selection on validation) and its best checkpoint is evaluated on
the test split; DIR/summary.json and DIR/summary.md give every metric as mean +- sample std.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ifnet.cli import add_config_arguments
from ifnet.errors import IFNetError, UsageError

HELP = "train and evaluate with several seeds, report mean +- std"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML training config")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: config seed, seed+1, ... (default 3)")
    parser.add_argument("--split", default="test", help="split each best checkpoint is evaluated on (default test)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: one run per seed + summary")
    parser.add_argument("--no-meteor", action="store_true")
    parser.add_argument("--resume", action="store_true", help="skip seeds whose evaluation already exists")


#: settings the seeds of one summary may run with differently (where each ran); everything else must match
WHERE_IT_RUNS = ("device", "data.annotation", "data.image_root", "data.num_workers")
#: numbers in an evaluation's metrics.json that are settings, not metrics: never averaged
DECODING_SETTINGS = ("num_studies", "beam_size", "max_len", "guidance", "mbr_samples")


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def run(args: argparse.Namespace) -> int:
    from ifnet.cli.train import resume_conflict
    from ifnet.config import resolve, to_dict
    from ifnet.data.annotation import load_annotation
    from ifnet.evaluation import evaluate_checkpoint
    from ifnet.io_utils import atomic_write_json, atomic_write_text
    from ifnet.train.config import TrainConfig
    from ifnet.train.trainer import Trainer

    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    base = resolve(TrainConfig, args.config, args.overrides)
    if base.data.annotation:  # the evaluation split is checked before hours of training, not after
        load_annotation(base.data.annotation, base.data.image_root or None, check_images=False, splits=(args.split,))
    configs = {}
    for i in range(args.seeds):  # every seed's config first: a --resume that would mix configs is refused up front
        seed = base.seed + i
        run_dir = args.out / f"seed{seed}"
        configs[seed] = resolve(TrainConfig, args.config, args.overrides + [f"seed={seed}"])
        if (run_dir / "config.json").exists():
            if not args.resume:
                raise IFNetError(f"{run_dir}: already holds a run; use --resume or another --out")
            conflict = resume_conflict(to_dict(resolve(TrainConfig, run_dir / "config.json")), to_dict(configs[seed]),
                                       may_change=lambda key: key in WHERE_IT_RUNS)
            if conflict:
                raise UsageError(f"--resume: {run_dir / 'config.json'}: {conflict}; the seeds of one summary must share "
                                 f"one config (only {', '.join(WHERE_IT_RUNS)} may differ)")
    per_seed: dict[int, dict] = {}
    for i, (seed, cfg) in enumerate(configs.items()):
        run_dir = args.out / f"seed{seed}"
        eval_dir = run_dir / f"eval-{args.split}"
        # index.html is the evaluation's last file: without it an interrupted evaluation is redone
        if args.resume and (eval_dir / "metrics.json").exists() and (eval_dir / "index.html").exists():
            per_seed[seed] = _seed_metrics(eval_dir)
            continue
        print(f"== seed {seed} ({i + 1}/{args.seeds})", flush=True)
        Trainer(cfg, run_dir, resume=(run_dir / "last").exists()).fit()
        evaluate_checkpoint(run_dir / "best", eval_dir, split=args.split, meteor=not args.no_meteor)
        per_seed[seed] = _seed_metrics(eval_dir)
    keys = [k for k, v in next(iter(per_seed.values())).items() if isinstance(v, (int, float)) and
            not isinstance(v, bool) and k not in DECODING_SETTINGS]
    summary = {k: dict(zip(("mean", "std"), mean_std([float(m[k]) for m in per_seed.values()]))) for k in keys}
    atomic_write_json(args.out / "summary.json", {"seeds": list(per_seed), "split": args.split,
                                                  "metrics": summary, "per_seed": per_seed})
    lines = [f"| metric | mean +- std over {len(per_seed)} seeds ({args.split}) |", "|---|---|"]
    lines += [f"| {k} | {v['mean']:.4f} +- {v['std']:.4f} |" for k, v in summary.items()]
    atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _seed_metrics(eval_dir: Path) -> dict:
    """One seed's metrics.json, plus the report-vs-condition F1s of its consistency.json when present."""
    from ifnet.io_utils import read_json

    metrics = dict(read_json(eval_dir / "metrics.json"))
    if (eval_dir / "consistency.json").exists():  # evaluations written before consistency.json existed lack it
        consistency = read_json(eval_dir / "consistency.json")
        metrics["consistency_F1_macro"] = consistency["F1_macro"]
        metrics["consistency_F1_micro"] = consistency["F1_micro"]
    return metrics
