"""Annotation and label-file loading: the real IU-Xray files in ../shared, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ifnet.data.annotation import Annotation, Study, load_annotation, load_label_file
from ifnet.errors import DataError, ValidationError
from ifnet.labels import OBSERVATIONS


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(path)


def _entry(sid: str, split: str, n_views: int = 2) -> dict:
    return {"id": sid, "report": f"Report of {sid}.", "image_path": [f"{sid}/{i}.png" for i in range(n_views)],
            "split": split}


def _write_tree(root: Path, data: dict) -> Path:
    """annotation.json + an images/ folder holding every listed image (R2Gen layout)."""
    for entries in data.values():
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("image_path"), list):
                for p in e["image_path"]:
                    if isinstance(p, str) and p and not p.startswith("/") and ".." not in p:
                        _png(root / "images" / p)
    path = root / "annotation.json"
    path.write_text(json.dumps(data))
    return path


# -- the real IU-Xray annotation ------------------------------------------------------------------

def test_real_iu_xray_test_split_with_synthetic_images(iu_annotation_path, iu_synth_images):
    ann = load_annotation(iu_annotation_path, iu_synth_images, splits=("test",))
    studies = ann.split("test")
    assert len(studies) == 590 and len(ann) == 590
    assert all(len(s.image_paths) == 2 and s.split == "test" for s in studies)
    first = studies[0]
    assert first.id == "CXR3030_IM-1405"
    assert first.image_paths == ["CXR3030_IM-1405/0.png", "CXR3030_IM-1405/1.png"]
    assert first.report.startswith("Normal cardiomediastinal silhouette.")
    assert ann.image_files(first)[1] == iu_synth_images / "CXR3030_IM-1405" / "1.png"
    assert ann.image_root == iu_synth_images


def test_real_iu_xray_all_splits_without_images(iu_annotation_path):
    ann = load_annotation(iu_annotation_path, check_images=False, min_views=2, max_views=2)
    assert {k: len(v) for k, v in ann.splits.items()} == {"train": 2069, "val": 296, "test": 590}
    assert len(ann.all_studies()) == 2955
    assert len({s.id for s in ann.all_studies()}) == 2955


def test_real_iu_xray_reports_every_missing_train_val_image(iu_annotation_path, iu_synth_images):
    # Only test images are rendered in ../shared: each of the 2365 train+val studies misses 2 images,
    # and all 4730 are reported in one error, none for the test split.
    with pytest.raises(ValidationError) as info:
        load_annotation(iu_annotation_path, iu_synth_images)
    problems = info.value.problems
    assert len(problems) == 4730
    assert all(p.field == "image_path" and "image not found" in p.detail for p in problems)
    assert all(p.path == str(iu_annotation_path) for p in problems)
    assert "4730 problem(s)" in str(info.value)


def test_default_image_root_is_r2gen_layout(tmp_path):
    path = _write_tree(tmp_path, {"train": [_entry("a", "train")], "val": [_entry("b", "val")],
                                  "test": [_entry("c", "test")]})
    ann = load_annotation(path)
    assert ann.image_root == tmp_path / "images"
    assert [s.id for s in ann.all_studies()] == ["a", "b", "c"]


# -- problems, all at once ------------------------------------------------------------------------

def test_many_problems_one_error(tmp_path):
    data = {
        "train": [
            _entry("ok1", "train"),
            {"report": "No id here.", "image_path": ["x/0.png"], "split": "train"},         # train[1]
            {"id": "empty", "report": "   ", "image_path": ["empty/0.png"]},                 # empty report
            {"id": "noimg", "report": "Fine.", "image_path": []},                            # no paths
            {"id": "nokey", "report": "Fine."},                                              # no image_path
            _entry("dup", "train"),
        ],
        "val": [
            _entry("dup", "val"),                                                            # duplicate id
            {"id": "abs", "report": "Fine.", "image_path": ["/etc/passwd"]},                 # absolute
            {"id": "up", "report": "Fine.", "image_path": ["../../secret.png"]},             # traversal
            {"id": 7.5, "report": "Fine.", "image_path": ["n/0.png"]},                       # val[3] bad id
        ],
        "test": [
            _entry("gone", "test"),
            {"id": "wrongsplit", "report": "Fine.", "image_path": ["ws/0.png"], "split": "train"},
            "not an object",                                                                  # test[2]
        ],
    }
    path = _write_tree(tmp_path, data)
    (tmp_path / "images" / "gone" / "1.png").unlink()                                       # missing image
    (tmp_path / "images" / "ok1" / "1.png").write_bytes(b"garbage, not a png")             # unreadable

    with pytest.raises(ValidationError) as info:
        load_annotation(path)
    got = {(p.record, p.field) for p in info.value.problems}
    expected = {
        ("train[1]", "id"), ("empty", "report"), ("noimg", "image_path"), ("nokey", "image_path"),
        ("dup", "id"), ("abs", "image_path"), ("up", "image_path"), ("val[3]", "id"),
        ("gone", "image_path"), ("wrongsplit", "split"), ("test[2]", None), ("ok1", "image_path"),
    }
    assert got == expected
    assert len(info.value.problems) == len(expected)
    assert all(p.path == str(path) for p in info.value.problems)
    text = str(info.value)
    assert text.startswith(f"{path}: 12 problem(s)")
    # every line names the file and the study; a sample of the exact lines:
    assert f"{path}: study empty: field 'report': empty report" in text
    assert f"{path}: study dup: field 'id': duplicate id: also at train[5], here at val[0]" in text
    assert "study up: field 'image_path': '../../secret.png': points outside the image folder" in text
    assert "study abs: field 'image_path': '/etc/passwd': absolute path" in text
    assert f"image not found: {tmp_path / 'images' / 'gone' / '1.png'}" in text
    assert "study ok1: field 'image_path': unreadable image" in text and "unrecognised image format" in text


def test_wrong_types(tmp_path):
    data = {"train": [{"id": "a", "report": ["list"], "image_path": "a/0.png"},
                      {"id": "b", "report": "Fine.", "image_path": ["b/0.png", 3]},
                      {"id": True, "report": "Fine.", "image_path": ["c/0.png"]}],
            "val": {"not": "a list"}, "test": []}
    path = _write_tree(tmp_path, data)
    with pytest.raises(ValidationError) as info:
        load_annotation(path)
    lines = [str(p) for p in info.value.problems]
    assert lines == [
        f"{path}: study a: field 'report': must be a string, got list",
        f"{path}: study a: field 'image_path': must be a list of image paths, got str",
        f"{path}: study b: field 'image_path': item 1 must be a non-empty path string, got 3",
        f"{path}: study train[2]: field 'id': must be a non-empty string, got True",
        f"{path}: field 'val': must be a list of studies, got dict",
    ]


def test_missing_split_and_missing_image_folder(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [_entry("a", "train")], "    ": []}))
    with pytest.raises(ValidationError) as info:
        load_annotation(path, tmp_path / "no_such_dir")
    assert [(p.record, p.field) for p in info.value.problems] == [(None, "image_root"), (None, "val"),
                                                                 (None, "test")]
    assert "image folder not found" in info.value.problems[0].detail
    assert "missing split (the file has: train,     )" in info.value.problems[1].detail
    # asking only for the split that exists, without image checks, works
    assert len(load_annotation(path, splits=("train",), check_images=False)) == 1


def test_view_count_limits(tmp_path):
    data = {"train": [_entry("one", "train", 1), _entry("two", "train", 2), _entry("three", "train", 3)],
            "val": [], "test": []}
    path = _write_tree(tmp_path, data)
    assert len(load_annotation(path).split("train")) == 3  # MIMIC-style: 1..n views is fine
    with pytest.raises(ValidationError) as info:
        load_annotation(path, min_views=2, max_views=2)
    assert [(p.record, p.detail) for p in info.value.problems] == [
        ("one", "has 1 image(s); at least 2 required"), ("three", "has 3 images; at most 2 allowed")]
    with pytest.raises(ValueError):
        load_annotation(path, min_views=0)


def test_same_image_twice_and_huge_image(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    data = {"train": [{"id": "twice", "report": "Fine.", "image_path": ["t/0.png", "t/0.png"]},
                      _entry("big", "train", 1)], "val": [], "test": []}
    path = _write_tree(tmp_path, data)
    # a PNG header declaring 20000 x 20000 pixels (no pixel data needed: only the header is probed)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))
    (tmp_path / "images" / "big" / "0.png").write_bytes(bomb)
    with pytest.raises(ValidationError) as info:
        load_annotation(path)
    details = {p.record: p.detail for p in info.value.problems}
    assert details["twice"] == "lists the same image more than once"
    assert "20000 x 20000" in details["big"] and "decompression bomb" in details["big"]


def test_malformed_json_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": [ {"id": "a",, } ]}')
    with pytest.raises(DataError, match="invalid JSON at line 1") as info:
        load_annotation(bad)
    assert not isinstance(info.value, ValidationError) and info.value.path == str(bad)
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_annotation(top)
    with pytest.raises(DataError, match="file not found"):
        load_annotation(tmp_path / "missing.json")


def test_annotation_helpers():
    a, b = Study("a", "r", ["a/0.png"], "train"), Study("b", "r", ["b/0.png", "b/1.png"], "test")
    ann = Annotation(Path("x.json"), {"train": [a], "test": [b]}, image_root=Path("/img"))
    assert ann.all_studies() == [a, b]
    assert ann.split("test") == [b]
    assert ann.image_files(b) == [Path("/img/b/0.png"), Path("/img/b/1.png")]
    with pytest.raises(DataError, match="split 'val' was not loaded"):
        ann.split("val")


# -- label files -----------------------------------------------------------------------------------

def test_real_label_file(shared_dir):
    labels = load_label_file(shared_dir / "data" / "iu_xray" / "labels_14.json")
    assert len(labels) == 2365
    np.testing.assert_array_equal(labels["CXR2384_IM-0942"], [0] * 13 + [1])
    assert labels["CXR2384_IM-0942"].dtype == np.int64
    # positive counts per column of the 2365 train+val studies in the file (SOURCE.md's larger
    # counts, 39 ... 2293, also include the withheld test studies)
    counts = np.stack(list(labels.values())).sum(axis=0)
    assert counts.tolist() == [32, 169, 228, 68, 54, 18, 80, 156, 12, 81, 20, 35, 23, 1806]


def test_plain_label_file_and_reordered_columns(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"s1": [1] + [0] * 13, "s2": [0] * 13 + [1]}))
    got = load_label_file(plain)
    assert sorted(got) == ["s1", "s2"]
    np.testing.assert_array_equal(got["s1"], [1] + [0] * 13)

    # columns given in reverse order: values are re-ordered into OBSERVATIONS order
    rev = tmp_path / "rev.json"
    rev.write_text(json.dumps({"columns": list(OBSERVATIONS[::-1]), "labels": {"s": [1] + [0] * 13}}))
    np.testing.assert_array_equal(load_label_file(rev)["s"], [0] * 13 + [1])  # [0] was "No Finding"


def test_bad_label_file_reports_every_problem(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"columns": list(OBSERVATIONS), "labels": {
        "short": [0] * 13, "uncertain": [-1] + [0] * 13, "text": ["1"] + [0] * 13, "ok": [0] * 14,
        "notlist": 5}}))
    with pytest.raises(ValidationError) as info:
        load_label_file(path)
    got = {p.record: p.detail for p in info.value.problems}
    assert set(got) == {"short", "uncertain", "text", "notlist"}
    assert got["short"] == "expected a list of 14 labels, got 13 values"
    assert got["notlist"] == "expected a list of 14 labels, got int"
    assert "got -1" in got["uncertain"] and "to_binary" in got["uncertain"]
    assert got["text"] == "labels must be 0 or 1, got '1'"
    assert all(p.field == "labels" and p.path == str(path) for p in info.value.problems)

    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"columns": ["a", "b"], "labels": {}}))
    with pytest.raises(DataError, match="14 CheXpert observations"):
        load_label_file(cols)


def test_thousands_of_problems_print_twenty_lines_and_a_count():
    from ifnet.errors import DataError, ValidationError

    error = ValidationError([DataError("a.json", f"problem {i}") for i in range(4570)], header="a.json: 4570 problems")
    lines = str(error).splitlines()
    assert len(lines) == 22 and lines[0] == "a.json: 4570 problems:" and lines[-1].strip() == "... and 4550 more"
    assert len(error.problems) == 4570
