"""Rule labeler benchmark: agreement with the IU-Xray CheXbert labels, and speed.

    python benchmarks/bench_labeler.py [--shared ../shared] [--repeat 5] [--no-docs]

Agreement is measured against ``labels_14.json`` (CheXbert, positive or uncertain = 1) on the text
CheXbert labelled, the IMPRESSION section of each OpenI report (read in place from
``raw/NLMCXR_reports.tgz``); the rules were tuned on the train split only, so val is held out.
The same numbers on the FINDINGS text (the ``report`` of annotation.json) are shown too: they
measure how much the two sections differ, not the labeler.

Speed is reports per second in one process on one core (no torch imported). Writes
``bench-results/labeler.json`` and the tables in ``docs/LABELER.md`` between the bench markers.
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
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ifnet.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from ifnet.labeler import Labeler  # noqa: E402
from ifnet.labeler.agreement import (ClassScore, format_table, load_openi_sections, micro_findings,  # noqa: E402
                                     per_class_scores, sections_for_studies)
from ifnet.labels import NO_FINDING_INDEX, to_binary  # noqa: E402

BEGIN, END = "<!-- bench_labeler:begin -->", "<!-- bench_labeler:end -->"
SPLITS = {"train (dev)": ("train",), "val (held out)": ("val",), "train+val": ("train", "val")}


def _score_dict(s: ClassScore) -> Dict[str, Any]:
    return {"support": s.support, "tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": round(s.precision, 4),
            "recall": round(s.recall, 4), "f1": round(s.f1, 4)}


def agreement(labeler: Labeler, texts: Sequence[str], truth: np.ndarray) -> Dict[str, Any]:
    pred = to_binary(labeler.label_batch(texts))
    classes = per_class_scores(truth, pred)
    return {"n": len(texts), "micro_13": _score_dict(micro_findings(truth, pred)),
            "no_finding": _score_dict(classes[NO_FINDING_INDEX]),
            "per_class": {c.name: _score_dict(c) for c in classes}, "_rows": classes,
            "_micro": micro_findings(truth, pred)}


def speed(labeler: Labeler, texts: Sequence[str], repeat: int) -> float:
    labeler.label_batch(texts[:50])  # warm caches
    start = time.perf_counter()
    for _ in range(repeat):
        labeler.label_batch(texts)
    return len(texts) * repeat / (time.perf_counter() - start)


def _markdown(results: Dict[str, Any]) -> str:
    out: List[str] = []
    meta = results["meta"]
    out.append(f"Measured {meta['date']} with `python benchmarks/bench_labeler.py` (Python {meta['python']}, "
               f"{meta['platform']}; {meta['cpu_note']}).")
    out.append("")
    out.append("**Against the text CheXbert labelled (IMPRESSION section):**")
    out.append("")
    out.append("| split | reports | micro-F1, 13 findings | No Finding F1 |")
    out.append("|---|---:|---:|---:|")
    for name, r in results["impression"].items():
        out.append(f"| {name} | {r['n']} | {r['micro_13']['f1']:.3f} | {r['no_finding']['f1']:.3f} |")
    out.append("")
    for name in ("train+val", "val (held out)"):
        out.append(f"Per class, impression text, {name}:")
        out.append("")
        out.append(format_table(results["impression"][name]["_rows"] + [results["impression"][name]["_micro"]]))
        out.append("")
    out.append("**On the FINDINGS text (`report` in annotation.json) against the same impression labels** "
               "(a different section, so this measures the section mismatch, not the labeler):")
    out.append("")
    out.append("| split | reports | micro-F1, 13 findings | No Finding F1 |")
    out.append("|---|---:|---:|---:|")
    for name, r in results["findings"].items():
        out.append(f"| {name} | {r['n']} | {r['micro_13']['f1']:.3f} | {r['no_finding']['f1']:.3f} |")
    out.append("")
    s = results["speed"]
    out.append(f"**Speed** (one process, one thread, torch not imported): {s['findings_reports_per_s']:.0f} "
               f"reports/s on the {s['n_findings']} annotation.json reports, {s['impression_reports_per_s']:.0f} "
               f"reports/s on the shorter impressions.")
    return "\n".join(out)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: bench markers {BEGIN} / {END} not found")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
    atomic_write_text(path, new)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = Path(os.environ.get("IFNET_SHARED", REPO.parent / "shared"))
    parser.add_argument("--shared", type=Path, default=default_shared, help="the read-only shared/ folder")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the reports for the speed number")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "labeler.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "LABELER.md")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/LABELER.md")
    args = parser.parse_args(argv)

    root = args.shared / "data" / "iu_xray"
    annotation = json.loads((root / "annotation.json").read_text(encoding="utf-8"))
    labels = json.loads((root / "labels_14.json").read_text(encoding="utf-8"))["labels"]
    sections = load_openi_sections(root / "raw" / "NLMCXR_reports.tgz")
    labeler = Labeler()

    results: Dict[str, Any] = {"impression": {}, "findings": {}}
    for name, splits in SPLITS.items():
        studies = [e for split in splits for e in annotation[split]]
        ids = [e["id"] for e in studies]
        truth = np.array([labels[i] for i in ids])
        results["impression"][name] = agreement(labeler, sections_for_studies(sections, ids, "impression"), truth)
        results["findings"][name] = agreement(labeler, [e["report"] for e in studies], truth)

    all_reports = [e["report"] for split in annotation.values() for e in split]
    all_ids = [e["id"] for split in annotation.values() for e in split]
    impressions = sections_for_studies(sections, all_ids, "impression")
    results["speed"] = {"n_findings": len(all_reports), "repeat": args.repeat,
                        "findings_reports_per_s": round(speed(labeler, all_reports, args.repeat), 1),
                        "impression_reports_per_s": round(speed(labeler, impressions, args.repeat), 1),
                        "torch_imported": "torch" in sys.modules}
    results["meta"] = {"date": _dt.date.today().isoformat(), "python": platform.python_version(),
                       "platform": platform.machine() or platform.system(),
                       "cpu_note": f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.2f} at the "
                                   "end; other jobs on the machine lower the speed"}

    for kind in ("impression", "findings"):
        for name, r in results[kind].items():
            print(f"{kind:10s} {name:32s} n={r['n']:5d} micro-F1(13)={r['micro_13']['f1']:.3f} "
                  f"NoFinding-F1={r['no_finding']['f1']:.3f}")
    print(format_table(results["impression"]["train+val"]["_rows"]))
    print(f"speed: {results['speed']['findings_reports_per_s']:.0f} reports/s (findings), "
          f"{results['speed']['impression_reports_per_s']:.0f} reports/s (impressions); "
          f"torch imported: {results['speed']['torch_imported']}")

    table = _markdown(results)
    clean = {k: ({n: {kk: vv for kk, vv in r.items() if not kk.startswith("_")} for n, r in v.items()}
                 if k in ("impression", "findings") else v) for k, v in results.items()}
    atomic_write_json(args.out, clean)
    if not args.no_docs:
        update_docs(args.docs, table)
    print(f"wrote {args.out}" + ("" if args.no_docs else f" and {args.docs}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
