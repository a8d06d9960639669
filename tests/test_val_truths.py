"""CE under two truths on validation (benchmarks/quality/truths.py and benchmarks/val_truths.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import val_truths  # noqa: E402
from quality.truths import cross_fitted_probe, goal_bars, label_retrieval, score_frames  # noqa: E402


def _labels(rows):
    return np.array(rows, dtype=np.int64)


def test_score_frames_against_each_truth():
    y = np.zeros((4, 14), np.int64)
    y[:2, 1] = 1  # Cardiomegaly in studies 0, 1
    y[2:, 13] = 1  # No Finding in 2, 3
    other = y.copy()
    other[:, 1] = [1, 0, 1, 0]  # one hit, one miss, one false alarm
    pred = y.copy()
    out = score_frames({"a": y, "b": other}, {"sys": pred})
    assert out["sys"]["a"]["F1_micro_13"] == 1.0
    # against b: Cardiomegaly TP 1, FP 1, FN 1 -> F1 0.5 over the 13 findings
    assert out["sys"]["b"]["F1_micro_13"] == pytest.approx(0.5)


def test_label_retrieval_prefers_exact_then_nearest_and_is_seeded():
    train = _labels([[0] * 13 + [1], [1] + [0] * 13, [1, 1] + [0] * 12, [1] + [0] * 13])
    val = _labels([[0] * 13 + [1], [1, 1] + [0] * 12, [0, 1] + [0] * 12])
    got = label_retrieval(train, val, seed=3)
    assert got[0] == 0 and got[1] == 2
    assert got[2] == 2  # [0,1,...] is 1 away from study 2 and 2 away from the others
    ties = _labels([[1] + [0] * 13] * 50)
    picks = {int(label_retrieval(train, ties[i:i + 1], seed=i)[0]) for i in range(50)}
    assert picks == {1, 3}  # both exact matches get picked
    np.testing.assert_array_equal(label_retrieval(train, ties, seed=1), label_retrieval(train, ties, seed=1))


def test_cross_fitted_probe_reads_a_separable_label():
    rng = np.random.default_rng(0)
    n_tr, n_va = 300, 120
    y_tr, y_va = np.zeros((n_tr, 14), np.int64), np.zeros((n_va, 14), np.int64)
    y_tr[:, 1] = rng.random(n_tr) < 0.3
    y_va[:, 1] = rng.random(n_va) < 0.3
    y_tr[:, 13], y_va[:, 13] = 1 - y_tr[:, 1], 1 - y_va[:, 1]
    x_tr = rng.normal(size=(n_tr, 6)) + 3.0 * y_tr[:, [1]]
    x_va = rng.normal(size=(n_va, 6)) + 3.0 * y_va[:, [1]]
    out = cross_fitted_probe(x_tr, y_tr, x_va, y_va, seed=0)
    assert out["pred"].shape == y_va.shape and out["probs"].shape == y_va.shape
    assert out["mean_auc"] > 0.95
    assert out["F1_micro_13"] > 0.85
    again = cross_fitted_probe(x_tr, y_tr, x_va, y_va, seed=0)
    np.testing.assert_array_equal(out["pred"], again["pred"])


def test_goal_bars():
    b = goal_bars({"constant": 0.06, "retrieval": 0.1}, 0.3)
    assert b == {"best_floor": "retrieval", "3x_best_floor": pytest.approx(0.3), "0.9x_probe": pytest.approx(0.27)}


def _mini_shared(src: Path, dst: Path, n_train: int = 40, n_val: int = 12) -> tuple[Path, list, list]:
    """A shared/ folder with the first studies of the real annotation and their real drawn labels."""
    ann = json.loads((src / "data/iu_xray/annotation.json").read_text())
    drawn = json.loads((src / "data/iu_xray/labels_14.json").read_text())
    # validation studies with a finding first, so the perfect-report check below has positives
    val = sorted(ann["val"], key=lambda s: "normal" in s["report"].lower())[:n_val]
    mini = {"train": ann["train"][:n_train], "val": val, "test": ann["test"][:2]}
    root = dst / "data/iu_xray"
    root.mkdir(parents=True)
    (root / "annotation.json").write_text(json.dumps(mini))
    keep = {s["id"] for s in mini["train"] + mini["val"]}
    (root / "labels_14.json").write_text(json.dumps(
        {"columns": drawn["columns"], "labels": {k: v for k, v in drawn["labels"].items() if k in keep}}))
    return dst, mini["train"], mini["val"]


def test_cli_end_to_end_and_errors(shared_dir: Path, tmp_path: Path, capsys):
    from safetensors.torch import save_file

    shared, train, val = _mini_shared(shared_dir, tmp_path / "shared")
    feats = tmp_path / "features"
    feats.mkdir()
    g = torch.Generator().manual_seed(0)
    ids = [s["id"] for s in train + val]
    save_file({i: torch.randn(2, 8, 2, 2, generator=g).half() for i in ids}, str(feats / "shard0-clahe.safetensors"))
    (feats / "shard0-low.json").write_text(json.dumps({i: [False, False] for i in ids}))
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"id": s["id"], "generated": s["report"]} for s in val]))
    out = tmp_path / "truths.json"
    args = ["--shared", str(shared), "--features", str(feats), "--predictions", f"copy={perfect}", "--out", str(out)]
    assert val_truths.main(args) == 0
    res = json.loads(out.read_text())
    # reports identical to the references say exactly the findings text's labels
    assert res["systems"]["copy"]["findings text"]["F1_micro_13"] == 1.0
    assert set(res["systems"]) >= {"floor: constant report", "floor: nearest-neighbour retrieval",
                                   "retrieval with the true labels (its text)", "copy"}
    assert set(res["bars"]) == {"findings text", "drawn labels"}
    assert res["studies"] == len(val) and set(res["probes"]) == {"findings text", "drawn labels"}
    own = res["systems"]["retrieval with the true labels (its drawn labels)"]["drawn labels"]
    assert 0.0 <= own["F1_micro_13"] <= 1.0
    assert "not IU-Xray" in capsys.readouterr().out

    # an existing --out is kept unless --overwrite
    before = out.read_text()
    assert val_truths.main(args) == 2
    assert out.read_text() == before
    assert "--overwrite" in capsys.readouterr().err

    # a predictions file that misses a validation study: one line naming the file and the field
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"id": val[0]["id"], "generated": "no acute findings ."}]))
    assert val_truths.main(["--shared", str(shared), "--features", str(feats), "--predictions", f"s={short}"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(short) in err and "id" in err and len(err.splitlines()) == 1
    assert val_truths.main(["--shared", str(shared), "--features", str(feats), "--predictions", "nonsense"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert val_truths.main(["--shared", str(shared), "--features", str(feats), "--kind", "tuned"]) == 2
    assert "no 'tuned' feature shards" in capsys.readouterr().err


def test_two_truth_view_on_constructed_labels():
    from quality.truths import two_truth_view, view_lines

    rng = np.random.default_rng(1)
    n_tr, n_va = 60, 20
    drawn_tr = (rng.random((n_tr, 14)) < 0.3).astype(np.int64)
    drawn_va = drawn_tr[rng.integers(0, n_tr, n_va)]  # every validation vector occurs in train
    flip = lambda y: np.where(rng.random(y.shape) < 0.2, 1 - y, y)  # noqa: E731 - the findings text disagrees a bit
    y_tr, y_va = flip(drawn_tr), flip(drawn_va)
    enc = lambda row: "".join(map(str, row))  # noqa: E731 - a "report" that spells out its labels
    label_fn = lambda texts: np.array([[int(c) for c in t] for t in texts.values()])  # noqa: E731
    ids = [f"v{i}" for i in range(n_va)]
    generated = {"says the drawn labels": {i: enc(r) for i, r in zip(ids, drawn_va)},
                 "floor: text-only": {i: enc(np.zeros(14, int)) for i in ids}}
    x_tr, x_va = rng.normal(size=(n_tr, 5)), rng.normal(size=(n_va, 5))
    view = two_truth_view(train_reports=[enc(r) for r in y_tr], y_train=y_tr, drawn_train=drawn_tr, y_val=y_va,
                          drawn_val=drawn_va, x_train=x_tr, x_val=x_va, val_ids=ids, generated=generated,
                          label_fn=label_fn)
    s = view["systems"]
    assert s["says the drawn labels"]["drawn labels"]["F1_micro_13"] == 1.0
    assert s["says the drawn labels"]["findings text"]["F1_micro_13"] < 1.0
    assert s["retrieval with the true labels (its drawn labels)"]["drawn labels"]["F1_micro_13"] == 1.0
    assert s["floor: text-only"]["drawn labels"]["F1_macro"] == 0.0
    # the bars take every floor, the generated text-only one included
    floors = {k: s[k]["drawn labels"]["F1_macro"] for k in s if k.startswith("floor:")}
    assert len(floors) == 3
    assert view["bars"]["drawn labels"]["3x_best_floor"] == pytest.approx(3 * max(floors.values()))
    table = view_lines(view)
    assert table[0].startswith("| system") and any("says the drawn labels" in line for line in table)
    from quality.report import truths_lines

    section = truths_lines({"val_truths": view})
    assert section[0].startswith("### Validation: CE against") and "(20 validation studies" in section[2]
    assert truths_lines({}) == []  # results written before the view existed
