"""``ifnet convert-openi``: an R2Gen-format annotation.json from the raw OpenI or Kaggle IU-Xray download.

The rules (study id, which studies are kept, frontal/lateral, image paths, split) are documented in
:mod:`ifnet.data.openi`; this module only reads the flags, checks the output targets before any work,
and writes the results atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from pathlib import Path
from typing import Optional

from ifnet.data.openi import (DEFAULT_FRACTIONS, LAYOUTS, SECTIONS, SPLITS, Conversion, ConvertOptions,
                              Skipped, convert, detect_layout, read_kaggle_reports, read_openi_reports,
                              read_projections, read_split_from)
from ifnet.errors import DataError, UsageError
from ifnet.io_utils import atomic_write_json, atomic_write_text, check_distinct_targets, check_writable_target

HELP = "build an R2Gen-format annotation.json from the raw OpenI / Kaggle IU-Xray download"

EPILOG = """\
what it reproduces:
  R2Gen's IU-Xray rules: a study is kept when its FINDINGS is non-empty and it has at least two
  images; its id is its first image id without the last -<digits> group (CXR2384_IM-0942); the
  report is the FINDINGS text as written. On NLMCXR_reports.tgz this gives back all 2955 studies
  of R2Gen's annotation.json with identical text (the split is ours unless --split-from).

image_path values (relative to --images), always [view 0, view 1]:
  r2gen   CXR2384_IM-0942/0.png, .../1.png  (R2Gen's image download; default without --images)
  openi   CXR2384_IM-0942-1001.png          (flat OpenI PNG folder)
  kaggle  2384_IM-0942-1001.dcm.png         (Kaggle images_normalized folder)
  With --images the layout is detected from the file names, and studies whose image files are
  missing are skipped (listed with the missing paths). Without --images nothing is checked.

frontal/lateral (--views):
  The OpenI XML has no view label. 'order' (R2Gen's rule) takes the first two images in id order,
  which is frontal-then-lateral for 87% of R2Gen's studies (11% are lateral-first, 2% hold one
  view twice). 'projection' takes the first Frontal and the first Lateral image from a Kaggle
  indiana_projections.csv (--projections) and skips studies lacking either; it is the default
  whenever a projections table is given.

split:
  studies are ordered by sha256("<seed>:<id>") and cut by --fractions: the same seed always gives
  the same split. --split-from reuses the split of an existing annotation (e.g. R2Gen's).

examples:
  ifnet convert-openi --reports NLMCXR_reports.tgz --out annotation.json --skipped skipped.tsv
  ifnet convert-openi --reports NLMCXR_reports.tgz --images NLMCXR_png \\
      --projections indiana_projections.csv --out annotation.json
  ifnet convert-openi --kaggle-csv indiana_reports.csv --images images/images_normalized --out a.json
"""


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three numbers like 0.7,0.1,0.2") from None
    if len(values) != 3 or any(v < 0 or v > 1 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r}: need three fractions in [0, 1] that sum to 1")
    return values  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reports", type=Path, metavar="TGZ|XML_DIR",
                        help="OpenI reports: NLMCXR_reports.tgz, or the folder of ecgen-radiology/*.xml")
    source.add_argument("--kaggle-csv", type=Path, metavar="REPORTS_CSV",
                        help="Kaggle indiana_reports.csv (its images come from indiana_projections.csv, "
                             "looked for beside it unless --projections is given)")
    parser.add_argument("--projections", type=Path, metavar="CSV",
                        help="Kaggle indiana_projections.csv: pairs frontal/lateral by label")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="images folder; when given, its layout is detected and studies with missing "
                             "images are skipped. Optional: without it nothing about images is checked")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto",
                        help="image_path naming (default: detected from --images, else r2gen)")
    parser.add_argument("--views", choices=("auto", "order", "projection"), default="auto",
                        help="frontal/lateral rule (default: projection when a projections table is "
                             "given, else order)")
    parser.add_argument("--section", choices=SECTIONS, default="findings",
                        help="report text: findings (R2Gen, default), impression, or both (findings "
                             "then impression)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--fractions", type=_fractions, default=DEFAULT_FRACTIONS, metavar="TRAIN,VAL,TEST",
                        help="split fractions (default 0.7,0.1,0.2)")
    parser.add_argument("--split-from", type=Path, metavar="ANNOTATION",
                        help="reuse the split of this R2Gen-format annotation; studies not in it are skipped")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="annotation.json to write")
    parser.add_argument("--skipped", type=Path, metavar="FILE",
                        help="list of skipped studies with the reason: JSON if FILE ends in .json, else TSV")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _check_targets(out: Path, skipped: Optional[Path], overwrite: bool) -> None:
    targets = [out] + ([skipped] if skipped is not None else [])
    check_distinct_targets({"--out": out, "--skipped": skipped})
    for target in targets:
        if target.is_dir():
            raise UsageError(f"{target}: is a folder; give a file name")
        check_writable_target(target, overwrite)


def _skipped_text(skipped: list[Skipped], path: Path) -> Optional[str]:
    """TSV text of the skipped list, or None when it is to be written as JSON."""
    if path.suffix.lower() == ".json":
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["id", "source", "reason", "detail"])
    writer.writerows([s.study_id, s.source, s.reason, s.detail] for s in skipped)
    return buffer.getvalue()


def _write_skipped(skipped: list[Skipped], path: Path) -> None:
    text = _skipped_text(skipped, path)
    if text is None:
        atomic_write_json(path, [{"id": s.study_id, "source": s.source, "reason": s.reason, "detail": s.detail}
                                 for s in skipped])
    else:
        atomic_write_text(path, text)


def _reason_summary(skipped: list[Skipped]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in Counter(s.reason for s in skipped).most_common())


def run(args: argparse.Namespace) -> int:
    _check_targets(args.out, args.skipped, args.overwrite)
    source: Path = args.reports if args.reports is not None else args.kaggle_csv

    projections_path: Optional[Path] = args.projections
    if args.kaggle_csv is not None and projections_path is None:
        projections_path = args.kaggle_csv.parent / "indiana_projections.csv"
        if not projections_path.is_file():
            raise UsageError(f"--kaggle-csv needs indiana_projections.csv: not found at {projections_path}; "
                             "pass --projections")
    projections = read_projections(projections_path) if projections_path is not None else None

    if args.kaggle_csv is not None:
        assert projections_path is not None
        studies = read_kaggle_reports(args.kaggle_csv, projections_path)
    else:
        studies = read_openi_reports(args.reports)

    layout = args.layout
    if layout == "auto":
        layout = detect_layout(args.images) if args.images is not None else "r2gen"
    views = args.views if args.views != "auto" else ("projection" if projections is not None else "order")
    options = ConvertOptions(section=args.section, seed=args.seed, fractions=tuple(args.fractions),
                             layout=layout, views=views, images_dir=args.images, projections=projections,
                             split_from=read_split_from(args.split_from) if args.split_from else None)
    result: Conversion = convert(studies, options)
    kept = sum(result.counts().values())
    if kept == 0:
        raise DataError(source, f"no study could be kept ({_reason_summary(result.skipped)}); nothing written")

    # The skipped list first: the annotation appearing is the sign that the whole run finished.
    if args.skipped is not None:
        _write_skipped(result.skipped, args.skipped)
    atomic_write_json(args.out, result.annotation)

    counts = result.counts()
    print(f"wrote {args.out}: {kept} studies ({', '.join(f'{s} {counts[s]}' for s in SPLITS)}); "
          f"layout {layout}, views by {views}, report from {args.section}")
    if result.skipped:
        where = f"listed in {args.skipped}" if args.skipped is not None else "pass --skipped FILE for the list"
        print(f"skipped {len(result.skipped)} of {len(studies)} studies: {_reason_summary(result.skipped)} "
              f"({where})")
    if views == "order" and layout != "r2gen":
        print("note: views follow image-id order, so view 0 is not always the frontal image; "
              "pass --projections indiana_projections.csv to pair them by label")
    return 0

