"""`ifnet evaluate --checkpoint CKPT [--split test] --out DIR`: decode a split, score it, write a page.

The preprocessing (image size, views, IEC) comes from the checkpoint's training config, so a user
never retypes a training flag. Only images reach the model; references are used for scoring after
decoding is finished.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ifnet.errors import IFNetError

HELP = "decode a split with a checkpoint and score it"
#: What evaluate writes into --out (none is replaced without --overwrite).
OUTPUTS = ("predictions.json", "metrics.json", "consistency.json", "index.html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (e.g. runs/iu/best)")
    parser.add_argument("--split", default="test", help="annotation split to decode (default: test)")
    parser.add_argument("--annotation", type=Path, help="annotation.json (default: the one the model was trained on)")
    parser.add_argument("--image-root", type=Path, help="image folder (default: the training one)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--beam-size", type=int, help="beam width (default: the training config's)")
    parser.add_argument("--max-len", type=int, help="maximum report length in tokens (default: the training config's)")
    parser.add_argument("--guidance", type=float, help="condition guidance weight (default: the training config's "
                        "eval.guidance; 0 = plain beam search)")
    parser.add_argument("--mbr-samples", type=int, help="choose each report by findings-preserving minimum Bayes-risk "
                        "decoding over N samples (default: the training config's eval.mbr_samples; 0 = off)")
    parser.add_argument("--limit", type=int, help="decode only the first N studies of the split")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    parser.add_argument("--examples", type=int, default=24, help="studies shown on the HTML page (default 24)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")


def run(args: argparse.Namespace) -> int:
    from ifnet.evaluation import evaluate_checkpoint

    out: Path = args.out
    if not args.overwrite:
        for name in OUTPUTS:
            if (out / name).exists():
                raise IFNetError(f"{out / name}: already exists; pass --overwrite to replace it")
    result = evaluate_checkpoint(args.checkpoint, out, split=args.split, annotation=args.annotation,
                                 image_root=args.image_root, beam_size=args.beam_size, max_len=args.max_len,
                                 guidance=args.guidance, mbr_samples=args.mbr_samples,
                                 limit=args.limit, meteor=not args.no_meteor, examples=args.examples,
                                 device=args.device)
    from ifnet.cli.score import format_table
    from ifnet.metrics.consistency import consistency_note

    print(format_table(result["metrics"]))
    print(consistency_note(result["consistency"]))
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}")
    return 0
