"""`ifnet generate --checkpoint CKPT FRONTAL [LATERAL] [--json] [--findings ...] [--heatmap OUT.png]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ifnet.errors import IFNetError, UsageError

HELP = "write the report for one new study (PNG, JPEG or DICOM)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint folder (e.g. runs/iu/best), or an `ifnet export` folder (ONNX Runtime)")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="the frontal image, then optionally the lateral (PNG, JPEG or DICOM)")
    parser.add_argument("--json", action="store_true", help="print JSON (report, findings, timings) instead of text")
    parser.add_argument("--findings", metavar="NAMES",
                        help="condition the memory on these findings (comma-separated observation names) instead "
                             "of the model's predictions: the radiologist-supplies-findings workflow")
    parser.add_argument("--heatmap", type=Path, metavar="OUT.png",
                        help="write the class activation map of the most probable finding (No Finding excluded: it has "
                             "no place to point at) over the frontal image, captioned with the finding")
    parser.add_argument("--beam-size", type=int, help="beam width (default: the training config's)")
    parser.add_argument("--max-len", type=int, help="maximum report length in tokens")
    parser.add_argument("--guidance", type=float, help="condition guidance weight (default: the checkpoint's "
                        "eval.guidance; 0 = plain beam search)")
    parser.add_argument("--mbr-samples", type=int, help="choose the report by findings-preserving minimum Bayes-risk "
                        "decoding over N samples (default: the checkpoint's eval.mbr_samples; 0 = off)")
    parser.add_argument("--variant", choices=("fp32", "int8"),
                        help="for an `ifnet export` folder: the fp32 or int8 model (default: the folder's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --heatmap file")


def run(args: argparse.Namespace) -> int:
    from ifnet.data.images import read_xray
    from ifnet.inference import heatmap_overlay_png, open_predictor, parse_findings, study_warnings
    from ifnet.io_utils import atomic_write_bytes, check_writable_folder, check_writable_target

    if len(args.images) > 2:
        raise IFNetError(f"at most two images (frontal, lateral); got {len(args.images)}")
    if args.heatmap is not None:
        if args.heatmap.suffix.lower() != ".png":
            raise UsageError(f"--heatmap {args.heatmap}: the heatmap is written as PNG; give a file name ending in .png")
        check_writable_target(args.heatmap, args.overwrite)
        check_writable_folder(args.heatmap.parent)
    findings = parse_findings(args.findings) if args.findings is not None else None
    views = [read_xray(p) for p in args.images]  # clear ImageError naming a bad file, before loading the model
    predictor = open_predictor(args.checkpoint, device=args.device, beam_size=args.beam_size, max_len=args.max_len,
                               guidance=args.guidance, mbr_samples=args.mbr_samples, variant=args.variant)
    pred = predictor.predict(views, findings=findings, heatmap=args.heatmap is not None)
    warnings = study_warnings([str(p) for p in args.images], views, predictor)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.heatmap is not None and pred.heatmap is not None:
        prob = pred.findings.get(pred.heatmap_label)
        caption = f"class activation map: {pred.heatmap_label}" + (f" (p = {prob:.2f})" if prob is not None else "")
        atomic_write_bytes(args.heatmap, heatmap_overlay_png(views[0], pred.heatmap, caption=caption))
    if args.json:
        doc = pred.to_json()
        doc["images"] = [str(p) for p in args.images]
        doc["warnings"] = warnings
        if args.heatmap is not None:
            doc["heatmap"] = str(args.heatmap)
        print(json.dumps(doc, indent=2))
        return 0
    print(pred.report)
    print()
    label = "supplied findings" if pred.conditioned_on == "supplied" else "predicted findings"
    print(f"{label} (probability from the label head):")
    for name, p in sorted(pred.findings.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<28} {p:.3f}")
    said = pred.consistency
    if said.get("unsaid"):
        print(f"in the condition but not said by the report: {', '.join(said['unsaid'])}")
    if said.get("unsupported"):
        print(f"said by the report but not in the condition: {', '.join(said['unsupported'])}")
    if args.heatmap is not None:
        print(f"heatmap ({pred.heatmap_label}) written to {args.heatmap}")
    return 0
