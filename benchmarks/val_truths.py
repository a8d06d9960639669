"""Validation CE under two truths: the findings text (the benchmark's CE) and the labels the images were drawn from.

    .venv/bin/python -m ifnet evaluate --checkpoint RUN/best --split val --out /tmp/ev --no-meteor
    .venv/bin/python benchmarks/val_truths.py --features bench-results/tmp/quality/features-<key> \\
        --predictions IFNet=/tmp/ev/predictions.json [--out bench-results/val-truths.json]

**Synthetic images, not IU-Xray results.** Validation only: the drawn (CheXbert) labels of the test split
are withheld, and nothing here is used to choose anything (see benchmarks/quality/truths.py). The feature
folder is one the quality benchmark cached (``--kind clahe`` for frozen features, ``tuned`` for a
top-tuned folder). Rows: the constant report, retrieval by image features, retrieval with the true labels
(the text of the train study whose drawn labels are nearest), the label probe trained on each truth's
training labels, and every ``--predictions`` file (reports generated for the validation split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from quality.features import load_sets  # noqa: E402
from quality.truths import findings_labels, two_truth_view, view_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_predictions(path: Path, ids: Sequence[str]) -> dict[str, str]:
    """``{id: generated}`` from an ``ifnet evaluate`` predictions.json; every id in ``ids`` must be there."""
    from ifnet.errors import DataError

    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read predictions: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, "expected a JSON list of {id, generated, ...} objects (ifnet evaluate's predictions.json)")
    got = {}
    for k, r in enumerate(rows):
        if not isinstance(r.get("id"), str) or not isinstance(r.get("generated"), str):
            raise DataError(path, "needs a string 'id' and 'generated'", field=f"[{k}]")
        got[r["id"]] = r["generated"]
    missing = [i for i in ids if i not in got]
    if missing:
        raise DataError(path, f"has no report for {len(missing)} of the {len(ids)} validation studies "
                              f"(first: {missing[0]}); decode with --split val and no --limit", field="id")
    return {i: got[i] for i in ids}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--features", type=Path, required=True, help="a feature folder of the quality benchmark's cache")
    p.add_argument("--kind", default="clahe", help="feature kind in that folder (clahe, none, tuned)")
    p.add_argument("--predictions", action="append", default=[], metavar="NAME=PATH",
                   help="reports generated for the validation split (ifnet evaluate --split val)")
    p.add_argument("--out", type=Path, help="write the numbers as JSON here")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)

    from ifnet.data.annotation import load_annotation, load_label_file
    from ifnet.errors import IFNetError

    try:
        if a.out and a.out.exists() and not a.overwrite:
            raise IFNetError(f"{a.out}: exists; pass --overwrite to replace it")
        named = []
        for item in a.predictions:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise IFNetError(f"--predictions {item!r}: expected NAME=PATH")
            named.append((name, Path(path)))
        ann = load_annotation(a.shared / "data/iu_xray/annotation.json", None, check_images=False)
        train, val = ann.split("train"), ann.split("val")
        tr_ids, va_ids = [s.id for s in train], [s.id for s in val]
        drawn = load_label_file(a.shared / "data/iu_xray/labels_14.json")
        y_tr = findings_labels({s.id: s.report for s in train})
        y_va = findings_labels({s.id: s.report for s in val})
        d_tr = np.stack([drawn[i] for i in tr_ids]).astype(np.int64)
        d_va = np.stack([drawn[i] for i in va_ids]).astype(np.int64)
        if not any(a.features.glob(f"shard*-{a.kind}.safetensors")):
            raise IFNetError(f"{a.features}: no '{a.kind}' feature shards there (a quality benchmark feature folder?)")
        fs = load_sets(a.features, (a.kind,))[0][a.kind]
        generated = {name: read_predictions(path, va_ids) for name, path in named}
        view = two_truth_view(train_reports=[s.report for s in train], y_train=y_tr, drawn_train=d_tr, y_val=y_va,
                              drawn_val=d_va, x_train=fs.pooled(tr_ids), x_val=fs.pooled(va_ids), val_ids=va_ids,
                              generated=generated, label_fn=findings_labels)
    except IFNetError as e:
        print(f"val_truths: {e}", file=sys.stderr)
        return 2

    print(f"Validation CE ({view['studies']} studies; macro-F1 over 14 / micro-F1 over the 13 findings); "
          "synthetic images, not IU-Xray results")
    print("\n".join(view_lines(view)))
    if a.out:
        from ifnet.io_utils import atomic_write_json

        atomic_write_json(a.out, {
            "note": "validation split; synthetic-image results, not IU-Xray results",
            "features": str(a.features), "kind": a.kind, "predictions": {n: str(p) for n, p in named},
            **view})
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
