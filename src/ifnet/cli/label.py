"""``ifnet label``: the 14 CheXpert observations for every report of an annotation file, or for one text.

    ifnet label --annotation annotation.json --out labels.json [--split train,val] [--binary]
    ifnet label --text "Mild cardiomegaly. No effusion." [--explain]
    ifnet label ... --labeler chexbert --chexbert-ckpt chexbert.pth --bert-dir bert-base-uncased/

The output file is written atomically and never replaces an existing file without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ifnet.errors import DataError, UsageError
from ifnet.io_utils import atomic_write_text, check_writable_target, read_json
from ifnet.labels import CODE_NAMES, OBSERVATIONS, to_binary

HELP = "label reports with the 14 CheXpert observations (offline rule-based labeler)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotation", type=Path, metavar="JSON",
                        help="R2Gen-format annotation.json ({split: [{id, report, ...}]})")
    source.add_argument("--text", metavar="REPORT", help="label one report and print a table")
    parser.add_argument("--split", default="all", metavar="NAMES",
                        help="comma-separated splits to label, e.g. train,val (default: all)")
    parser.add_argument("--out", type=Path, metavar="JSON", help="labels file to write (with --annotation)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--binary", action="store_true",
                        help="write 0/1 labels (uncertain counts as positive) in the labels_14.json layout")
    parser.add_argument("--explain", action="store_true",
                        help="with --text: show the phrase, cue and sentence behind each label")
    parser.add_argument("--labeler", choices=("rules", "chexbert"), default="rules",
                        help="rules: offline phrase + negation labeler (default); chexbert: a local CheXbert checkpoint")
    parser.add_argument("--chexbert-ckpt", type=Path, metavar="PTH", help="local chexbert.pth (with --labeler chexbert)")
    parser.add_argument("--bert-dir", type=Path, metavar="DIR",
                        help="local bert-base-uncased folder with config.json and vocab.txt (with --labeler chexbert)")
    parser.add_argument("--device", default="cpu", help="torch device for --labeler chexbert (default: cpu)")


def _check_usage(args: argparse.Namespace) -> None:
    if args.annotation is not None and args.out is None:
        raise UsageError("--annotation needs --out FILE")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text: the report is empty")
    if args.text is not None and (args.out is not None or args.binary):
        raise UsageError("--text prints a table; --out and --binary go with --annotation")
    if args.explain and (args.text is None or args.labeler != "rules"):
        raise UsageError("--explain works with --text and the rules labeler")
    if args.labeler == "chexbert" and (args.chexbert_ckpt is None or args.bert_dir is None):
        raise UsageError("--labeler chexbert needs --chexbert-ckpt FILE and --bert-dir DIR")
    if args.labeler == "rules" and (args.chexbert_ckpt is not None or args.bert_dir is not None):
        raise UsageError("--chexbert-ckpt/--bert-dir are used only with --labeler chexbert")


def _make_labeler(args: argparse.Namespace) -> Any:
    if args.labeler == "chexbert":
        from ifnet.labeler.chexbert import load_chexbert

        return load_chexbert(args.chexbert_ckpt, args.bert_dir, device=args.device)
    from ifnet.labeler import Labeler

    return Labeler()


def read_reports(path: Path, splits: str) -> List[Tuple[str, str]]:
    """(study id, report) pairs of the chosen splits, in file order; DataError names file and field."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataError(path, "expected a JSON object mapping split names to lists of studies")
    names = list(data) if splits.strip() == "all" else [s.strip() for s in splits.split(",") if s.strip()]
    if not names:
        raise UsageError("--split is empty; give names such as train,val or 'all'")
    unknown = [n for n in names if n not in data]
    if unknown:
        raise DataError(path, f"no split {unknown[0]!r} (the file has: {', '.join(map(str, data))})")
    pairs: List[Tuple[str, str]] = []
    seen: Dict[str, str] = {}
    for split in names:
        studies = data[split]
        if not isinstance(studies, list):
            raise DataError(path, f"split '{split}' must be a list of studies, not {type(studies).__name__}")
        for i, entry in enumerate(studies):
            where = f"{split}[{i}]"
            if not isinstance(entry, dict):
                raise DataError(path, f"entry {where} must be an object", field=None)
            study = entry.get("id")
            if not isinstance(study, str) or not study:
                raise DataError(path, f"entry {where} has no string id", field="id")
            if "report" not in entry:
                raise DataError(path, "missing", record=study, field="report")
            if not isinstance(entry["report"], str):
                raise DataError(path, f"must be a string, not {type(entry['report']).__name__}",
                                record=study, field="report")
            if study in seen:
                raise DataError(path, f"duplicate id (also in split '{seen[study]}')", record=study, field="id")
            seen[study] = split
            pairs.append((study, entry["report"]))
    return pairs


def build_output(ids: Sequence[str], codes: np.ndarray, *, binary: bool, labeler: str, source: Path,
                 splits: str) -> Dict[str, Any]:
    """The JSON document ``ifnet label`` writes (CheXpert codes, or 0/1 like labels_14.json)."""
    if binary:
        values = to_binary(codes)
        note = (f"Labels from `ifnet label --labeler {labeler} --binary` on {source.name} (splits: {splits}). "
                "1 = positive or uncertain, 0 = negative or not mentioned; No Finding = 1 when no finding "
                "other than Support Devices is positive or uncertain.")
        return {"_note": note, "columns": list(OBSERVATIONS),
                "labels": {i: [int(v) for v in row] for i, row in zip(ids, values)}}
    return {"columns": list(OBSERVATIONS), "codes": {str(k): v for k, v in CODE_NAMES.items()},
            "labeler": labeler, "source": str(source), "splits": splits,
            "labels": {i: [int(v) for v in row] for i, row in zip(ids, codes)}}


def dumps_labels(doc: Dict[str, Any]) -> str:
    """JSON text with one study per line: small, diff-friendly, and still plain JSON."""
    head = {k: v for k, v in doc.items() if k != "labels"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "labels": {']
    rows = [f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v)}" for k, v in doc["labels"].items()]
    lines.append(",\n".join(rows))
    lines.append("}}")
    return "\n".join(lines) + "\n"


def _print_table(codes: np.ndarray, reasons: Sequence[str] = ()) -> None:
    for j, name in enumerate(OBSERVATIONS):
        line = f"{name:<27} {CODE_NAMES[int(codes[j])]:<14}"
        if reasons:
            line += f" {reasons[j]}"
        print(line.rstrip())


def run(args: argparse.Namespace) -> int:
    _check_usage(args)
    if args.text is not None:
        labeler = _make_labeler(args)
        if args.explain:
            explanation = labeler.explain(args.text)
            _print_table(explanation.codes, [item.reason for item in explanation])
        else:
            _print_table(labeler.label(args.text))
        return 0
    # Check the target before the (possibly slow) labelling so a refusal comes at once.
    check_writable_target(args.out, args.overwrite)
    pairs = read_reports(args.annotation, args.split)
    labeler = _make_labeler(args)
    codes = labeler.label_batch([report for _, report in pairs])
    doc = build_output([study for study, _ in pairs], codes, binary=args.binary, labeler=args.labeler,
                       source=args.annotation, splits=args.split)
    atomic_write_text(args.out, dumps_labels(doc))
    positives = int((codes[:, :-1] == 1).sum())
    print(f"labelled {len(pairs)} reports ({positives} positive findings) -> {args.out}", file=sys.stderr)
    return 0
