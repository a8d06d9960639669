"""`ifnet tune-top --config CFG [--set key=value ...] --out TRUNK.safetensors [--extra-labels FILE]`.

Fine-tunes the stride-32 stage of the config's pretrained CNN on the training studies' labels, on a CPU
(:mod:`ifnet.models.tuning`): the frozen bottom runs once per image, the top trains on its activations,
the epoch is chosen on the validation studies. The output is a whole trunk in the naming
``model.weights_path`` reads, so a CPU-budget run then trains on the tuned features with::

    ifnet train --config CFG --set model.weights_path=TRUNK.safetensors --out runs/NAME

Targets: the labels the config's label head learns (``data.head_labels``, else ``data.labels``, else the
offline labeler on the training reports), plus the 14 columns of ``--extra-labels`` if given (e.g. labels of
another report section). The epoch is chosen by the mean ROC AUC of the first 14 outputs against the same
kind of labels of the validation studies. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ifnet.cli import add_config_arguments
from ifnet.errors import IFNetError, UsageError

HELP = "fine-tune the top stage of the CNN on the training labels (CPU), for model.weights_path"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config of the run that will use the tuned trunk")
    parser.add_argument("--out", type=Path, required=True, help="tuned trunk to write (.safetensors)")
    parser.add_argument("--extra-labels", type=Path, default=None,
                        help="a second label file (same format as data.labels) whose 14 columns are extra targets")
    parser.add_argument("--epochs", type=int, default=None, help="tuning epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the tuned stage (default: 3e-5)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    import numpy as np
    import torch
    from safetensors.torch import save

    from ifnet import __version__
    from ifnet.config import resolve
    from ifnet.data.annotation import load_annotation, load_label_file
    from ifnet.data.images import read_xray
    from ifnet.data.transforms import ImageTransform
    from ifnet.io_utils import atomic_write_bytes, check_writable_target
    from ifnet.models.tuning import TopTuningConfig, apply_per_study, tune_top
    from ifnet.models.visual import create_extractor
    from ifnet.train.config import TrainConfig
    from ifnet.train.data import image_config
    from ifnet.train.trainer import study_labels

    if args.out.suffix != ".safetensors":
        raise IFNetError(f"{args.out}: --out must be a .safetensors file")
    check_writable_target(args.out, args.overwrite)
    cfg = resolve(TrainConfig, args.config, args.overrides)
    d, m = cfg.data, cfg.model
    if not d.annotation or not d.image_root:
        raise IFNetError("data.annotation and data.image_root must be set (in the YAML or with --set)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    tuning = TopTuningConfig(seed=cfg.seed)
    if args.epochs is not None:
        tuning = replace(tuning, epochs=args.epochs)
    if args.lr is not None:
        tuning = replace(tuning, lr=args.lr)
    ann = load_annotation(d.annotation, d.image_root, check_images=True, splits=("train", "val"),
                          max_views=d.max_views)
    train, val = ann.split("train")[: d.train_limit], ann.split("val")[: d.val_limit]  # a slice, as `ifnet train`
    if not train or not val:
        raise IFNetError(f"{d.annotation}: need non-empty train and val splits (tuning chooses its epoch on val)")
    source = d.head_labels or d.labels
    labels = study_labels(train + val, source)
    targets = {s.id: labels[s.id] for s in train}
    if args.extra_labels is not None:
        extra = load_label_file(args.extra_labels)
        missing = [s.id for s in train if s.id not in extra]
        if missing:
            raise IFNetError(f"{args.extra_labels}: no labels for {len(missing)} of {len(train)} training studies "
                             f"(e.g. {missing[0]!r})")
        targets = {i: np.concatenate([t, extra[i].astype(np.float32)]) for i, t in targets.items()}

    net = create_extractor(m.extractor, m.pretrained, m.weights_path, freeze=True).eval()
    bottom, _ = net.split()
    transform = ImageTransform(image_config(d), train=False)
    t0 = time.time()
    views = ((s.id, torch.stack([transform(read_xray(p)) for p in ann.image_files(s)[: d.max_views]]))
             for s in train + val)
    mids = apply_per_study(bottom, views, batch_size=16)
    print(f"bottom activations of {len(mids)} studies in {time.time() - t0:.0f} s", flush=True)
    y_val = np.stack([labels[s.id] for s in val])
    result = tune_top(net, [mids[s.id] for s in train], np.stack([targets[s.id] for s in train]),
                      [mids[s.id] for s in val], y_val, select=list(range(y_val.shape[1])),
                      views=d.max_views, config=tuning, log=lambda msg: print(msg, flush=True))
    meta = {"format": "ifnet-tuned-trunk-1", "ifnet": __version__, "extractor": m.extractor,
            "image": json.dumps(asdict(image_config(d))), "labels": str(source or "labeler"),
            "extra_labels": str(args.extra_labels or ""), "best_epoch": str(result.best_epoch),
            "val_mean_auc": f"{result.best_val_mean_auc:.6f}", "tuning": json.dumps(result.config),
            "history": json.dumps(result.history)}
    atomic_write_bytes(args.out, save(net.trunk_state_dict(), metadata=meta))
    print(f"epoch {result.best_epoch} kept (validation mean AUC {result.best_val_mean_auc:.4f}); wrote {args.out}\n"
          f"train on it with: --set model.weights_path={args.out}")
    return 0
