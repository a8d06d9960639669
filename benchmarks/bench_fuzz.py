"""Long fuzzing run: every target of tests/test_reliability_fuzz.py for 10,000+ examples.

    python benchmarks/bench_fuzz.py [--examples 10000] [--target NAME ...] [--seed 0] [--no-docs | --docs-only]

CI runs the same targets for a few hundred derandomized examples; here each target gets ``--examples``
random examples (seeded, so a run can be repeated). A crash is any failure hypothesis reports (after
shrinking it to a minimal input): it is recorded with its message, the other targets still run, and
the exit status is 1. Writes ``bench-results/fuzz.json`` (examples, crashes, seconds per target) and
the fuzzing table of ``docs/RELIABILITY.md`` between the bench markers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import test_reliability_fuzz as fuzz  # noqa: E402

from ifnet.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

BEGIN, END = "<!-- bench_fuzz:begin -->", "<!-- bench_fuzz:end -->"

#: What each target feeds in, for the table.
WHAT = {
    "annotation": "annotation.json: random JSON, well-formed studies with traversal paths, random bytes, deep nesting",
    "checkpoint_files": "config/vocab/training_state/meta.json of a checkpoint edited at random (sha256 fixed up)",
    "enhance_stored_params": "the parameters chunk `ifnet enhance` reads back from PNGs",
    "image_decoding": "random bytes, truncated and bit-flipped PNG/JPEG/DICOM, forged PNG/JPEG headers",
    "image_size_guard": "headers declaring empty or huge images (PNG, JPEG, DICOM); decoders must not run",
    "label_file": "labels.json: random JSON, 13-15 values of every type, random bytes, deep nesting",
    "labeler": "random text and report-like word salad (unicode, punctuation, numbering)",
    "report_cleaning": "the same texts through both R2Gen cleaners",
    "rest_api": "POST /v1/reports: random multipart parts, names, file names, content types, sizes, images",
    "tokenizer": "vocabulary built from random reports; encode/decode of random text",
    "vocab_file": "vocab.json: random JSON and edited valid vocabularies",
}


def run(names: Sequence[str], examples: int, seed: int) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    for name in names:
        reason = fuzz.TARGETS[name].available()
        if reason:
            results[name] = {"skipped": reason}
            print(f"{name:24s} skipped: {reason}", flush=True)
            continue
        start = time.perf_counter()
        entry: Dict[str, Any] = {"crashes": 0}
        try:
            entry["examples"] = fuzz.run_target(name, examples, derandomize=False, random_seed=seed)
        except Exception as e:  # a falsifying example, shrunk by hypothesis (in the exception's notes)
            error = "".join(traceback.format_exception_only(type(e), e)).strip()
            entry.update(examples=None, crashes=1, error=error[:4000])
            print(error, file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if entry.get("examples"):
            entry["examples_per_second"] = round(entry["examples"] / max(entry["seconds"], 1e-9), 1)
        results[name] = entry
        print(f"{name:24s} examples {entry.get('examples')}  crashes {entry['crashes']}  {entry['seconds']} s",
              flush=True)
    return results


def table(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = ["| target | inputs | examples | crashes | time (s) |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| `{name}` | {WHAT.get(name, '')} | skipped | - | - |")
            continue
        lines.append(f"| `{name}` | {WHAT.get(name, '')} | {r['examples'] if r['examples'] is not None else '-'} "
                     f"| {r['crashes']} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"`python benchmarks/bench_fuzz.py --examples {meta['examples_per_target']} --seed {meta['seed']}`, "
                 f"{meta['date']}, hypothesis {meta['hypothesis']}, Python {meta['python']} on {meta['cpus']} CPU "
                 f"core(s) ({meta['platform']}); total {meta['total_seconds']:.0f} s. Results in "
                 "`bench-results/fuzz.json`.")
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: bench markers {BEGIN} / {END} not found")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
    atomic_write_text(path, new)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="examples per target (default 10000)")
    parser.add_argument("--target", action="append", choices=sorted(fuzz.TARGETS),
                        help="run only this target (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "fuzz.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/RELIABILITY.md")
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs table from --out; run nothing")
    args = parser.parse_args(argv)
    if args.docs_only:
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        write_docs(args.docs, table(saved["targets"], saved["meta"]))
        print(f"updated {args.docs}")
        return 0

    import logging

    import cv2
    import hypothesis
    import torch

    torch.set_num_threads(1)
    # Decoders complain about every mangled input; the outcome is what counts, not their log lines.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    names = args.target or sorted(fuzz.TARGETS)
    start = time.perf_counter()
    results = run(names, args.examples, args.seed)
    meta = {"date": _dt.date.today().isoformat(), "examples_per_target": args.examples, "seed": args.seed,
            "hypothesis": hypothesis.__version__, "python": platform.python_version(),
            "platform": platform.machine() or platform.system(), "cpus": os.cpu_count(),
            "total_seconds": round(time.perf_counter() - start, 1),
            "crashes": sum(r.get("crashes", 0) for r in results.values())}
    atomic_write_json(args.out, {"meta": meta, "targets": results})
    print(f"wrote {args.out}")
    if not args.no_docs:
        write_docs(args.docs, table(results, meta))
        print(f"updated {args.docs}")
    return 1 if meta["crashes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
