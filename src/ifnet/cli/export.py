"""`ifnet export --checkpoint CKPT --format onnx --out DIR [--int8] [--compare N]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ifnet.errors import IFNetError, UsageError

HELP = "export a checkpoint to ONNX (optionally int8)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (e.g. runs/iu/best)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (only onnx)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: backbone/encoder/decoder_step .onnx, vocab.json, manifest.json")
    parser.add_argument("--int8", action="store_true",
                        help="also write dynamically quantized int8 graphs (the folder's default variant then)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--compare", type=int, metavar="N", default=None,
                        help="with --int8: decode N studies with fp32 and int8 and report the metric change "
                             "(default 20 when the training annotation is on disk; 0 skips)")
    parser.add_argument("--compare-split", default="test", help="split for --compare (default: test)")
    parser.add_argument("--compare-annotation", type=Path,
                        help="annotation.json for --compare (default: the checkpoint's training annotation)")
    parser.add_argument("--compare-images", type=Path, help="image folder for --compare-annotation")


def run(args: argparse.Namespace) -> int:
    from ifnet.export.onnx_export import DEFAULT_OPSET, export_checkpoint
    from ifnet.io_utils import atomic_write_json

    if args.compare is not None and args.compare < 0:
        raise UsageError("--compare must be >= 0")
    if args.compare and not args.int8:
        raise UsageError("--compare needs --int8 (it measures what int8 changes)")
    if args.compare:  # what --compare decodes is checked before minutes of export, not after
        _check_compare_data(args)
    manifest = export_checkpoint(args.checkpoint, args.out, int8=args.int8, overwrite=args.overwrite,
                                 opset=args.opset or DEFAULT_OPSET)
    model = manifest["model"]
    print(f"exported {args.checkpoint} ({model['extractor']}, {model['attention']} attention, "
          f"d_model {model['d_model']}) to {args.out} (opset {manifest['opset']})")
    for name, info in manifest["files"].items():
        print(f"  {name:<26} {info['bytes'] / 1e6:9.2f} MB")
    for variant, check in manifest["verification"].items():
        diffs = ", ".join(f"{k.replace('_max_abs_diff', '')} {v:.2e}" for k, v in check.items())
        print(f"  {variant}: max |ONNX Runtime - PyTorch| on the export example: {diffs}")
    if not args.int8 or args.compare == 0:
        return 0
    annotation = args.compare_annotation or Path(manifest["data_config"]["annotation"])
    images = args.compare_images or (None if args.compare_annotation else Path(manifest["data_config"]["image_root"]))
    if not annotation.is_file():
        if args.compare:
            raise _missing_annotation(annotation, args)
        print(f"int8 metric change not measured: the training annotation {annotation} is not on disk "
              "(pass --compare N --compare-annotation FILE --compare-images DIR)")
        return 0
    from ifnet.export.compare import REPORTED_METRICS, compare_variants

    limit = args.compare or 20
    print(f"decoding {limit} {args.compare_split} studies with fp32 and int8 ...")
    report = compare_variants(args.out, annotation=annotation, image_root=images, split=args.compare_split,
                              limit=limit)
    atomic_write_json(args.out / "int8_report.json", report)
    print(f"{'variant':<8} " + " ".join(f"{k:>12}" for k in REPORTED_METRICS) + "  same tokens as fp32")
    for variant, row in report["variants"].items():
        print(f"{variant:<8} " + " ".join(f"{row.get(k, float('nan')):12.4f}" for k in REPORTED_METRICS)
              + f"  {row['same_tokens_as_fp32']:.0%}")
    print(f"written to {args.out / 'int8_report.json'}: "
          + json.dumps(report["variants"].get("int8", {}).get("change_vs_fp32", {})))
    agreement = report["variants"].get("int8", {}).get("same_tokens_as_fp32")
    if agreement is not None and agreement < INT8_AGREEMENT_WARNING:
        print(f"warning: int8 writes the same report as fp32 for only {agreement:.0%} of {limit} studies; "
              f"generate and serve use the int8 model by default: judge the metric change above, or pass "
              f"--variant fp32 to them", file=sys.stderr)
    return 0


#: Below this share of studies with fp32's exact tokens, export warns about the int8 default.
INT8_AGREEMENT_WARNING = 0.5


def _check_compare_data(args: argparse.Namespace) -> None:
    """--compare's annotation (given, or the checkpoint's training annotation) exists and holds --compare-split."""
    from ifnet.data.annotation import load_annotation
    from ifnet.models.checkpoint import read_meta

    annotation = args.compare_annotation
    if annotation is None:
        data = ((read_meta(args.checkpoint).get("metadata") or {}).get("train_config") or {}).get("data") or {}
        if not data.get("annotation"):
            return  # export reports the checkpoint's problem
        annotation = Path(data["annotation"])
    if not Path(annotation).is_file():
        raise _missing_annotation(annotation, args)
    load_annotation(annotation, args.compare_images, check_images=False, splits=(args.compare_split,))


def _missing_annotation(annotation: Path, args: argparse.Namespace) -> IFNetError:
    return IFNetError(f"--compare: annotation {annotation} not found"
                      + ("" if args.compare_annotation else "; pass --compare-annotation"))
