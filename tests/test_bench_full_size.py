"""The full-size GPU run's script (benchmarks/bench_full_size.py), checked on the CPU at smoke scale.

The GPU machine is lent rarely and briefly, so its one command must not fail for a reason a CPU can
catch: missing inputs in the carry, a scorer the machine lacks, a wrong path, unreadable outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_full_size  # noqa: E402


def test_prepare_then_smoke_run_on_cpu(shared_dir: Path, tmp_path: Path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    assert bench_full_size.main(["prepare", "--smoke", "--shared", str(shared_dir), "--dest", str(carry)]) == 0
    info = json.loads((carry / "prepared.json").read_text())
    assert info["studies"] == bench_full_size.SMOKE_SIZES
    ann = json.loads((carry / "annotation.json").read_text())
    assert sorted(p.name for p in (carry / "test_images").iterdir()) == sorted(s["id"] for s in ann["test"])
    # only the pure-Python scorers travel (no jars, no data): the package is 100 MB, the carry limit 64 MiB
    assert all(p.suffix == ".py" for p in (carry / "site").rglob("*") if p.is_file())
    assert info["megabytes"] < 10

    assert bench_full_size.main(["run", "--smoke", "--carry", str(carry), "--out", str(out),
                                 "--work", str(tmp_path / "work")]) == 0
    res = json.loads((out / "full_size.json").read_text())
    assert res["smoke"] is True and res["train_exit"] == 0 and not res["budget_ended_training"]
    assert res["epochs_done"] == 2 and len(res["epoch_seconds"]) == 2
    assert res["best"]["epoch"] in (1, 2)
    assert set(res["seconds"]) == {"render", "train", "evaluate", "total"}
    # test scored once, with the keys `ifnet score` writes, METEOR off (no Java on the GPU machine)
    for key in ("BLEU_1", "BLEU_4", "ROUGE_L", "CE_F1_macro", "CE_F1_micro", "CE_F1_micro_5"):
        assert 0.0 <= res["test"][key] <= 1.0
    assert res["test"]["CIDEr"] >= 0.0
    assert "METEOR" not in res["test"] and res["test"]["split"] == "test"
    assert res["test"]["num_studies"] == bench_full_size.SMOKE_SIZES["test"]
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == bench_full_size.SMOKE_SIZES["test"]
    assert {"metrics.csv", "curves.png", "train.log", "evaluate.log"} <= {p.name for p in out.iterdir()}
    # rendered train/val images sit beside links to the carried test images
    images = tmp_path / "work" / "images"
    for split in ("train", "val", "test"):
        for study in ann[split]:
            assert all((images / p).is_file() for p in study["image_path"])


def test_run_needs_a_gpu_unless_smoke(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_full_size.main(["run", "--carry", str(tmp_path), "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / "work")])


def test_prepare_names_a_missing_input(tmp_path: Path):
    with pytest.raises(SystemExit, match=r"annotation\.json \(annotation\) not found"):
        bench_full_size.main(["prepare", "--shared", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "c")])
