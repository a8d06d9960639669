"""IEC benchmarks: ``ifnet enhance`` throughput (1 and 2 workers), and the adaptive criterion's agreement.

    .venv/bin/python benchmarks/bench_enhance.py                 # throughput on the 1180 test images
    .venv/bin/python benchmarks/bench_enhance.py --update-docs   # also rewrite the table in docs/IEC.md
    .venv/bin/python benchmarks/bench_enhance.py --agreement     # criterion vs quality.json instead
    .venv/bin/python benchmarks/bench_enhance.py --agreement --images /tmp/x --truth /tmp/x/synth_meta.jsonl

Each run enhances every image into a fresh temporary folder through the same library call the CLI
makes (read -> CLAHE -> PNG encode -> atomic write with fsync), timed by wall clock. The inputs are
read once beforehand so that the first configuration does not pay for a cold page cache. The
configurations are interleaved (1, 2, 1, 2, ...) and the best of ``--repeats`` runs of each is
reported (the least disturbed by other load). The machine's load average
is recorded before and after, because on a shared machine the numbers move with it.

Writes bench-results/enhance.json and prints a Markdown table.

``--agreement`` judges every image with the adaptive IEC's criterion (ifnet.iec.quality) and compares
with the renderer's record of which studies are low quality (``quality.json`` for the test images, or
``synth_meta.jsonl`` of a ``synth_cxr.py`` run): recall per low-quality type, false-positive rate on
normal images and precision, per image (each view inherits its study's label) and per study (judged
low if either view is). Writes bench-results/iec_quality.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = Path(os.environ.get("IFNET_SHARED", REPO_ROOT.parent / "shared")) / "data" / "iu_xray_synth" / "images"
DOC = REPO_ROOT / "docs" / "IEC.md"
BEGIN, END = "<!-- bench-enhance:begin -->", "<!-- bench-enhance:end -->"
QUALITY_TYPES = ("low_contrast", "overexposed", "underexposed", "hazy")


def parse_args(argv: List[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="input folder (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count, interleaved; the best is kept")
    p.add_argument("--mode", choices=("clahe", "adaptive"), default="clahe")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results" / "enhance.json")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the table between the markers in {DOC}")
    p.add_argument("--agreement", action="store_true",
                   help="measure the adaptive criterion against the recorded image quality instead")
    p.add_argument("--truth", type=Path, default=None,
                   help="quality.json or synth_meta.jsonl (default: quality.json beside --images)")
    return p.parse_args(argv)


def load_truth(path: Path) -> dict:
    """study id -> low-quality type or None, from quality.json or a synth_meta.jsonl."""
    import json

    if path.suffix == ".jsonl":
        truth = {}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                truth[record["id"]] = record["lowq"]
        return truth
    return json.loads(path.read_text(encoding="utf-8"))["quality"]


def agreement(images: Path, truth_path: Path) -> dict:
    from ifnet.data.images import read_xray
    from ifnet.iec.quality import LowQualityCriterion

    truth = load_truth(truth_path)
    criterion = LowQualityCriterion()
    kinds = ("normal",) + QUALITY_TYPES
    per_image = {k: [0, 0] for k in kinds}  # kind -> [judged low, total]
    per_study = {k: [0, 0] for k in kinds}
    reasons: dict = {}
    for sid in sorted(truth):
        kind = truth[sid] or "normal"
        views = sorted((images / sid).glob("*.png"))
        judged = [criterion.assess(read_xray(v)) for v in views]
        for report in judged:
            per_image[kind][0] += report.low_quality
            per_image[kind][1] += 1
            for reason in report.reasons:
                reasons.setdefault(kind, {}).setdefault(reason, 0)
                reasons[kind][reason] += 1
        per_study[kind][0] += any(r.low_quality for r in judged)
        per_study[kind][1] += 1

    def rates(table: dict) -> dict:
        tp = sum(table[k][0] for k in QUALITY_TYPES)
        pos = sum(table[k][1] for k in QUALITY_TYPES)
        fp, neg = table["normal"]
        return {"recall": {k: table[k][0] / table[k][1] for k in QUALITY_TYPES if table[k][1]},
                "recall_all_low_quality": tp / pos if pos else None,
                "false_positive_rate_normal": fp / neg if neg else None,
                "precision": tp / (tp + fp) if tp + fp else None,
                "counts_judged_low_of_total": table}

    return {"criterion": criterion.describe(), "images_dir": str(images), "truth": str(truth_path),
            "per_image": rates(per_image), "per_study_any_view": rates(per_study),
            "reasons_per_kind": reasons}


def agreement_table(result: dict) -> str:
    lines = ["| | " + " | ".join(QUALITY_TYPES) + " | all low quality | normal judged low (FPR) | precision |",
             "|---|" + "---:|" * (len(QUALITY_TYPES) + 3)]
    for level in ("per_image", "per_study_any_view"):
        r = result[level]
        counts = r["counts_judged_low_of_total"]
        cells = [f"{counts[k][0]}/{counts[k][1]} ({r['recall'][k]:.0%})" for k in QUALITY_TYPES]
        lines.append(f"| {level.replace('_', ' ')} | " + " | ".join(cells)
                     + f" | {r['recall_all_low_quality']:.1%} | {counts['normal'][0]}/{counts['normal'][1]}"
                       f" ({r['false_positive_rate_normal']:.1%}) | {r['precision']:.1%} |")
    return "\n".join(lines)


def warm_page_cache(root: Path) -> int:
    n = 0
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()
            n += 1
    return n


def time_run(images: Path, settings, workers: int) -> dict:
    from ifnet.iec.enhance import enhance_tree

    with tempfile.TemporaryDirectory(prefix="ifnet-bench-enhance-") as tmp:
        start = time.perf_counter()
        summary = enhance_tree(images, Path(tmp) / "out", settings, workers=workers, report=lambda m: None)
        seconds = time.perf_counter() - start
        # A second pass finds everything up to date: the cost of a no-op re-run.
        start = time.perf_counter()
        again = enhance_tree(images, Path(tmp) / "out", settings, workers=workers, report=lambda m: None)
        rerun = time.perf_counter() - start
    if summary.failed or again.enhanced:
        raise SystemExit(f"benchmark run not clean: {summary.line()} / re-run: {again.line()}")
    return {"seconds": seconds, "images": summary.enhanced, "images_per_s": summary.enhanced / seconds,
            "rerun_seconds": rerun, "load_after": os.getloadavg()[0]}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['date']} on {m['cpu_count']} CPU cores ({m['platform']}), "
        f"OpenCV {m['opencv']}, {result['images']} images of {result['images_dir_name']}, mode "
        f"{result['settings']['mode']}, best of {result['repeats']}. 1-minute load average before: "
        f"{m['load_before']:.2f} (a busy machine lowers these numbers, the 2-worker one most).",
        "",
        "| workers | seconds | images/s | no-op re-run (s) |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(f"| {r['workers']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['rerun_seconds']:.2f} |")
    if result.get("speedup_2_vs_1") is not None:
        lines += ["", f"2 workers / 1 worker: **{result['speedup_2_vs_1']:.2f}x**."]
    if max(m["load_before"], m["load_after"]) >= 0.5 * m["cpu_count"]:
        lines += ["", f"**Busy machine**: the load average was {m['load_before']:.1f} before and "
                      f"{m['load_after']:.1f} after on {m['cpu_count']} cores, so other processes held "
                      "the cores these runs needed; the figures, and the multi-worker ones most, are "
                      "lower bounds. Re-run on a quiet machine."]
    return "\n".join(lines)


def update_docs(text: str) -> None:
    from ifnet.io_utils import atomic_write_text

    doc = DOC.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(DOC, f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: List[str] | None = None) -> int:
    args = parse_args(argv)
    import cv2

    from ifnet.iec.enhance import EnhanceSettings
    from ifnet.io_utils import atomic_write_json

    if not args.images.is_dir():
        print(f"bench_enhance: {args.images}: no such folder (set IFNET_SHARED or pass --images)", file=sys.stderr)
        return 2
    if args.agreement:
        truth = args.truth or args.images.parent / "quality.json"
        found = agreement(args.images, truth)
        out = args.out.with_name("iec_quality.json") if args.out.name == "enhance.json" else args.out
        atomic_write_json(out, found)
        print(agreement_table(found))
        return 0
    worker_counts = [int(w) for w in args.workers.split(",")]
    settings = EnhanceSettings(mode=args.mode)
    n_files = warm_page_cache(args.images)
    load_before = os.getloadavg()[0]
    print(f"{n_files} files in {args.images}; load average {load_before:.2f}; "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    # Interleave the configurations (1, 2, 1, 2, ...) so that a change in the machine's load
    # during the benchmark hits both alike instead of biasing the ratio.
    runs: dict = {w: [] for w in worker_counts}
    for _ in range(args.repeats):
        for workers in worker_counts:
            runs[workers].append(time_run(args.images, settings, workers))
    results = []
    for workers in worker_counts:
        best = min(runs[workers], key=lambda r: r["seconds"])
        results.append({"workers": workers, **best, "all_seconds": [r["seconds"] for r in runs[workers]]})
        all_runs = ", ".join(f"{r['seconds']:.2f}" for r in runs[workers])
        print(f"workers={workers}: {best['images']} images in {best['seconds']:.2f} s = "
              f"{best['images_per_s']:.1f} images/s (runs: {all_runs} s)", file=sys.stderr)
    by_workers = {r["workers"]: r for r in results}
    speedup = (by_workers[2]["images_per_s"] / by_workers[1]["images_per_s"]
               if 1 in by_workers and 2 in by_workers else None)
    result = {
        "benchmark": "ifnet enhance",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "images_dir_name": args.images.name if args.images.name != "images" else "iu_xray_synth/images",
        "images": results[0]["images"],
        "settings": settings.params(),
        "repeats": args.repeats,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(terse=True),
                    "python": platform.python_version(), "opencv": cv2.__version__,
                    "load_before": load_before, "load_after": os.getloadavg()[0]},
        "results": results,
        "speedup_2_vs_1": speedup,
    }
    atomic_write_json(args.out, result)
    text = table(result)
    print(text)
    if args.update_docs:
        update_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
