"""`ifnet demo [--out DIR]`: the whole pipeline on the embedded phantom sample, no download needed.

1. writes a small procedural two-view chest-phantom dataset with reports (ifnet.demo),
2. labels the training reports with the offline labeler (the text encoder) and checks it against
   the phantom's true labels,
3. trains a small IFNet on the CPU (on-the-fly CLAHE enhancement, linear-attention SAFormer),
4. evaluates the best checkpoint (chosen on validation) on the held-out test split,
5. writes DIR/metrics.json and DIR/index.html (studies, enhanced images, generated vs reference
   reports, findings, training curves).
"""

from __future__ import annotations

import argparse
import shutil
import time
from importlib import resources
from pathlib import Path

from ifnet.errors import IFNetError, UsageError

HELP = "the whole pipeline on a generated sample, no download needed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the demo config's)")
    parser.add_argument("--studies", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help="phantom studies per split (default 240 30 60)")
    parser.add_argument("--seed", type=int, default=0, help="phantom generation seed")
    parser.add_argument("--overwrite", action="store_true",
                        help="also write into a non-empty folder that is not a demo output folder, provided none of "
                             "the demo's entries (" + ", ".join(DEMO_ENTRIES[1:]) + ") is there already. In an "
                             "earlier demo's folder those entries are replaced; nothing else is ever touched")


#: what `ifnet demo` writes into --out (the marker first); a rerun replaces these and only these
DEMO_ENTRIES = (".ifnet-demo", "data", "run", "eval", "index.html", "metrics.json")


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ifnet.config import resolve
    from ifnet.demo.dataset import DemoSplit, write_demo_dataset
    from ifnet.evaluation import evaluate_checkpoint
    from ifnet.io_utils import atomic_write_json, existing_entries, read_json, remove_path
    from ifnet.labeler import label_reports
    from ifnet.labels import FINDINGS, to_binary
    from ifnet.train.config import TrainConfig
    from ifnet.train.trainer import Trainer

    out: Path = args.out
    studies = tuple(args.studies or (240, 30, 60))
    if any(n < 1 for n in studies):
        raise UsageError(f"--studies: every split needs at least one study, got {' '.join(map(str, studies))}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        demo_folder = (out / DEMO_ENTRIES[0]).exists()
        if any(out.iterdir()) and not demo_folder:
            if not args.overwrite:
                raise IFNetError(f"{out}: exists and is not a demo folder; choose another --out, or pass --overwrite to "
                                 f"write the demo's entries into it (nothing else there is touched)")
            taken = existing_entries(out, DEMO_ENTRIES[1:])
            if taken:  # the user's own files that happen to carry the demo's names: never deleted
                raise IFNetError(f"{out}: {', '.join(taken)} already there and not written by `ifnet demo`; "
                                 "move them away or choose another --out")
        if demo_folder:
            for name in DEMO_ENTRIES:  # an earlier demo's output; never anything the demo did not write
                remove_path(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_ENTRIES[0]).write_text("made by `ifnet demo`; safe to delete\n")
    t_start = time.time()

    counts = DemoSplit(*studies)
    print(f"[1/4] generating {counts.train}/{counts.val}/{counts.test} phantom studies in {out / 'data'}")
    info = write_demo_dataset(out / "data", counts, seed=args.seed)

    print("[2/4] labelling the reports with the offline labeler (the text encoder)")
    ann = read_json(info["annotation"])
    truth = read_json(info["labels"])["labels"]
    train_val = ann["train"] + ann["val"]
    predicted = to_binary(label_reports([e["report"] for e in train_val]))
    gold = np.asarray([truth[e["id"]] for e in train_val])
    tp = int(((predicted == 1) & (gold == 1))[:, : len(FINDINGS)].sum())
    fp = int(((predicted == 1) & (gold == 0))[:, : len(FINDINGS)].sum())
    fn = int(((predicted == 0) & (gold == 1))[:, : len(FINDINGS)].sum())
    labeler_f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    print(f"      labeler vs phantom truth, micro-F1 over 13 findings: {labeler_f1:.3f}")

    config_path = resources.files("ifnet.resources") / "demo.yaml"
    overrides = [f"data.annotation={info['annotation']}", f"data.image_root={info['image_root']}"]
    if args.epochs is not None:
        overrides.append(f"optim.epochs={args.epochs}")
    with resources.as_file(config_path) as cfg_file:
        cfg = resolve(TrainConfig, cfg_file, overrides)
    print(f"[3/4] training a small IFNet ({cfg.model.extractor}, d_model {cfg.model.transformer.d_model}, "
          f"{cfg.model.transformer.attention} attention, IEC {cfg.data.iec}) for {cfg.optim.epochs} epochs on the CPU")
    run_dir = out / "run"
    result = Trainer(cfg, run_dir).fit()

    print(f"[4/4] evaluating the best checkpoint (epoch {result.best_epoch}, chosen on validation) on the test split")
    ev = evaluate_checkpoint(run_dir / "best", out / "eval", split="test", examples=24, notes=(
        "Procedural phantom images made by `ifnet demo`: this page checks the pipeline; its numbers are "
        "not results on X-rays.",))
    metrics = {k: v for k, v in ev["metrics"].items()}
    summary = {**metrics, "labeler_micro_F1_13_vs_phantom_truth": round(labeler_f1, 4),
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "wall_seconds": round(time.time() - t_start, 1),
               "note": "procedural phantom images generated by ifnet.demo: a pipeline check, not a result on real X-rays"}
    atomic_write_json(out / "metrics.json", summary)
    shutil.copyfile(out / "eval" / "index.html", out / "index.html")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}, indent=1))
    print(f"open {out / 'index.html'} to see studies, enhanced images, reports, findings and training curves")
    return 0
