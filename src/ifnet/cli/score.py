"""``ifnet score``: NLG metrics and clinical efficacy of generated vs reference reports.

Both inputs are JSON objects ``{study_id: "report"}`` or ``{study_id: ["report", ...]}`` (a
hypothesis list must hold exactly one report); or ``--predictions`` gives the ``predictions.json`` that
``ifnet evaluate`` writes (a list of ``{"id", "generated", "reference", ...}``), to rescore it. Prints a table; ``--out`` writes the scores as JSON,
``--per-study`` writes one row per study as JSON or CSV (chosen by the file's extension).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ifnet.errors import DataError, IFNetError, UsageError
from ifnet.io_utils import atomic_write, atomic_write_json, check_distinct_targets, check_writable_target, read_json
from ifnet.labels import OBSERVATIONS

HELP = "BLEU/METEOR/ROUGE-L/CIDEr and clinical efficacy of generated vs reference reports"

# Kept literal (not imported from ifnet.metrics) so `ifnet score --help` does not load pycocoevalcap.
_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "CE")
_CLEANERS = ("iu_xray", "mimic_cxr", "none")
_PER_STUDY_FORMATS = (".json", ".csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refs", type=Path, metavar="REFS.json",
                        help="reference reports: {study_id: text} or {study_id: [text, ...]}")
    parser.add_argument("--hyps", type=Path, metavar="HYPS.json",
                        help="generated reports with the same study ids: {study_id: text} or {study_id: [text]}")
    parser.add_argument("--predictions", type=Path, metavar="PREDICTIONS.json",
                        help="instead of --refs and --hyps: the predictions.json of `ifnet evaluate` "
                             "(its 'generated' and 'reference' of each 'id')")
    parser.add_argument("--out", type=Path, metavar="FILE.json",
                        help="write the scores to this JSON file")
    parser.add_argument("--per-study", type=Path, metavar="FILE",
                        help="write per-study scores and labels; .json or .csv")
    parser.add_argument("--overwrite", action="store_true", help="replace --out / --per-study files that exist")
    parser.add_argument("--cleaner", choices=_CLEANERS, default="iu_xray",
                        help="R2Gen report cleaning applied to both sides before scoring (default: %(default)s); "
                             "'none' scores the texts as given (whitespace still folded)")
    parser.add_argument("--uncertain", choices=("positive", "negative"), default="positive",
                        help="how an uncertain label counts in clinical efficacy (default: %(default)s)")
    parser.add_argument("--metrics", nargs="+", choices=_METRICS, default=list(_METRICS), metavar="METRIC",
                        help=f"metrics to compute, any of {' '.join(_METRICS)} (default: all)")
    parser.add_argument("--no-meteor", action="store_true",
                        help="skip METEOR (the only metric that needs Java)")


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _read_reports(path: Path, *, hypotheses: bool) -> dict[str, Union[str, list[str]]]:
    """Read and check a {study_id: text | [text]} file; problems are one line naming file and study."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, f"expected a JSON object {{study_id: report}}, got JSON {_json_type(data)}")
    if not data:
        raise DataError(path, "no studies in file")
    bad: list[tuple[str, str]] = []
    for study, value in data.items():
        if isinstance(value, str):
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if hypotheses and len(value) != 1:
                bad.append((study, f"expected one generated report, got a list of {len(value)}"))
            continue
        if isinstance(value, list):
            got = "an empty list" if not value else "a list holding non-strings"
        else:
            got = f"JSON {_json_type(value)}"
        bad.append((study, f"value must be a report string or a list of report strings, got {got}"))
    if bad:
        study, message = bad[0]
        more = f" (and {len(bad) - 1} more studies with bad values)" if len(bad) > 1 else ""
        raise DataError(path, message + more, record=study)
    return data


def _read_predictions(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(references, hypotheses) from `ifnet evaluate`'s predictions.json; problems name the file and record."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"expected the JSON array `ifnet evaluate` writes, got JSON {_json_type(data)}")
    if not data:
        raise DataError(path, "no studies in file")
    refs: dict[str, str] = {}
    hyps: dict[str, str] = {}
    for i, row in enumerate(data):
        where = f"record {i}"
        if not isinstance(row, dict):
            raise DataError(path, f"expected an object, got JSON {_json_type(row)}", record=where)
        study = row.get("id")
        if not isinstance(study, str) or not study:
            raise DataError(path, "field 'id' must be a non-empty string", record=where)
        for field, target in (("reference", refs), ("generated", hyps)):
            if not isinstance(row.get(field), str):
                raise DataError(path, f"field {field!r} must be a report string, got JSON {_json_type(row.get(field))}",
                                record=study)
            if study in target:
                raise DataError(path, "the same study id twice", record=study)
            target[study] = row[field]
    return refs, hyps


def _per_study_target(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _PER_STUDY_FORMATS:
        raise IFNetError(f"--per-study {path}: unknown format {suffix or '(no extension)'!r}; "
                         f"use a .json or .csv file name")
    return suffix


def _write_per_study_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    metric_cols = [k for k in rows[0] if k not in ("id", "references", "hypothesis", "ref_labels", "hyp_labels")]
    has_labels = "ref_labels" in rows[0]
    header = ["id", "reference", "hypothesis", *metric_cols]
    if has_labels:
        header += [f"ref:{o}" for o in OBSERVATIONS] + [f"hyp:{o}" for o in OBSERVATIONS]
    with atomic_write(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            # Several references share one cell, separated the way METEOR's protocol separates them.
            line = [row["id"], " ||| ".join(row["references"]), row["hypothesis"]]
            line += [repr(row[k]) for k in metric_cols]  # repr: the exact float, round-trippable
            if has_labels:
                line += [row["ref_labels"][o] for o in OBSERVATIONS] + [row["hyp_labels"][o] for o in OBSERVATIONS]
            writer.writerow(line)


def format_table(scores: Mapping[str, Any]) -> str:
    """The printed table: one metric per line, CE lines carrying their observation set and mapping."""
    uncertain = scores.get("CE_uncertain")
    lines = [f"{'metric':<16}{'value':>8}"]
    for key, value in scores.items():
        if not isinstance(value, float):
            continue
        note = ""
        if key.startswith("CE_"):
            group = "5 observations" if key.endswith("_5") else "14 observations"
            note = f"   {group}, uncertain -> {uncertain}"
        lines.append(f"{key:<16}{value:>8.4f}{note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ifnet.metrics import describe_id_mismatch, score_reports  # heavy: pycocoevalcap, numpy
    from ifnet.metrics.scoring import EmptyReferenceError

    mixed = args.predictions is not None and (args.refs is not None or args.hyps is not None)
    incomplete = args.predictions is None and (args.refs is None or args.hyps is None)
    if mixed or incomplete:
        raise UsageError("give --refs and --hyps, or --predictions (the predictions.json of `ifnet evaluate`)")
    metrics = [m for m in args.metrics if not (args.no_meteor and m == "METEOR")]
    if not metrics:
        raise IFNetError("--no-meteor leaves no metric to compute")
    # Check every output before spending minutes on scoring.
    check_distinct_targets({"--out": args.out, "--per-study": args.per_study})
    if args.out is not None:
        check_writable_target(args.out, args.overwrite)
    if args.per_study is not None:
        fmt = _per_study_target(args.per_study)
        check_writable_target(args.per_study, args.overwrite)

    if args.predictions is not None:
        refs, hyps = _read_predictions(args.predictions)
    else:
        refs = _read_reports(args.refs, hypotheses=False)
        hyps = _read_reports(args.hyps, hypotheses=True)
        mismatch = describe_id_mismatch(list(refs), list(hyps), refs_name=str(args.refs), hyps_name=str(args.hyps))
        if mismatch:
            raise IFNetError(mismatch)

    try:
        report = score_reports(refs, hyps, cleaner=args.cleaner, metrics=metrics, uncertain=args.uncertain)
    except EmptyReferenceError as e:
        source = args.predictions if args.predictions is not None else args.refs
        raise DataError(source, "empty reference (no words left after cleaning)", record=e.study,
                        field="reference" if args.predictions is not None else None) from None
    print(format_table(report.scores))
    if args.out is not None:
        atomic_write_json(args.out, {**report.scores, "cleaner": args.cleaner, "num_studies": len(refs)})
        print(f"scores written to {args.out}", file=sys.stderr)
    if args.per_study is not None:
        if fmt == ".json":
            atomic_write_json(args.per_study, report.per_study)
        else:
            _write_per_study_csv(args.per_study, report.per_study)
        print(f"per-study scores written to {args.per_study}", file=sys.stderr)
    return 0
