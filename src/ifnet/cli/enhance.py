"""``ifnet enhance IN_DIR OUT_DIR``: CLAHE (IEC) of a folder of X-rays into a mirrored folder.

The work is done by :func:`ifnet.iec.enhance.enhance_tree`; this module only parses options,
decides whether to show a progress bar, and prints the summary. Exit status: 0 if every image was
enhanced or already up to date, 1 if any failed, 2 for bad usage (missing IN_DIR, OUT_DIR inside
IN_DIR without --in-place).
"""

from __future__ import annotations

import argparse
import sys

HELP = "CLAHE image enhancement (IEC) of a folder of X-rays into a new folder"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tile_grid(text: str) -> int:
    from ifnet.iec.clahe import MAX_TILE_GRID

    value = _positive_int(text)
    if value > MAX_TILE_GRID:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TILE_GRID}, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Apply CLAHE (OpenCV, grayscale) to every PNG/JPEG/DICOM under IN_DIR and write lossless "
        "PNGs to OUT_DIR with the same folder layout (x.jpg and x.dcm become x.png; DICOM gives "
        "16-bit PNG; 16-bit images are equalised on 256 grey levels, so an 8-bit and a 16-bit copy of one X-ray "
        "give the same pixels). IN_DIR is never modified, and a file that is itself an output of enhance is "
        "not enhanced again. Outputs that are up to date (made from this very input file, by size and "
        "modification time, and with the same parameters) are skipped, so a re-run changes nothing; a file in OUT_DIR "
        "that enhance did not write is never replaced without --overwrite.")
    parser.add_argument("in_dir", metavar="IN_DIR", help="folder of input images (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the enhanced PNGs (created if needed)")
    parser.add_argument("--clip-limit", type=_positive_float, default=1.7,
                        help="CLAHE clip limit, in multiples of the mean histogram bin (default: 1.7, the paper's)")
    parser.add_argument("--tile-grid", type=_tile_grid, default=8,
                        help="CLAHE tiles per side: the image is split into N x N tiles (default: 8; at most 64)")
    parser.add_argument("--mode", choices=("clahe", "adaptive"), default="clahe",
                        help="clahe: enhance every image (default). adaptive: enhance only images "
                             "judged low quality (raised black level or low white level, see "
                             "docs/IEC.md) and write the others unchanged")
    parser.add_argument("--adaptive", dest="mode", action="store_const", const="adaptive",
                        help="same as --mode adaptive")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="worker processes, one image at a time each (default: 1)")
    parser.add_argument("--in-place", action="store_true",
                        help="allow OUT_DIR to be IN_DIR or inside it. With OUT_DIR = IN_DIR, PNG "
                             "inputs are overwritten by their enhanced versions")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in OUT_DIR that ifnet enhance did not write (by default "
                             "they are left alone and reported as failed)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ifnet.iec.enhance import EnhanceSettings, enhance_tree

    settings = EnhanceSettings(mode=args.mode, clip_limit=args.clip_limit, tile_grid=args.tile_grid)
    show_bar = not args.quiet and sys.stderr.isatty()
    summary = enhance_tree(args.in_dir, args.out_dir, settings, workers=args.workers,
                           in_place=args.in_place, overwrite=args.overwrite, progress=show_bar)
    line = summary.line()
    if settings.mode == "adaptive" and summary.enhanced:
        line += (f"; adaptive: {summary.judged_low} judged low quality and enhanced, "
                 f"{summary.enhanced - summary.judged_low} written unchanged")
    print(line)
    if not (summary.enhanced or summary.skipped or summary.failed):
        # Success with nothing done is most often the wrong folder; say so instead of staying silent.
        print(f"warning: no {'/'.join(sorted(_suffixes()))} files found under {args.in_dir}",
              file=sys.stderr)
    if summary.ignored:
        print(f"ignored {summary.ignored} non-image file(s) in {args.in_dir} "
              f"(enhanced: {', '.join(sorted(_suffixes()))})", file=sys.stderr)
    return 1 if summary.failed else 0


def _suffixes() -> frozenset:
    from ifnet.iec.enhance import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES
