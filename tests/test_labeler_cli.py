"""`ifnet label`: the labels file, --binary, --text/--explain, refusals and one-line data errors."""

from __future__ import annotations

import json

import pytest

from ifnet.cli import main
from ifnet.labels import OBSERVATIONS

ANNOTATION = {
    "train": [
        {"id": "s1", "report": "Mild cardiomegaly. No pleural effusion.", "image_path": ["s1/0.png"], "split": "train"},
        {"id": "s2", "report": "Heart size normal. Lungs are clear.", "image_path": ["s2/0.png"], "split": "train"},
    ],
    "val": [{"id": "s3", "report": "Possible left basilar pneumonia.", "image_path": ["s3/0.png"], "split": "val"}],
    "test": [{"id": "s4", "report": "", "image_path": ["s4/0.png"], "split": "test"}],
}


@pytest.fixture
def annotation(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ANNOTATION))
    return path


def col(name: str) -> int:
    return OBSERVATIONS.index(name)


def test_writes_codes_for_all_splits(annotation, tmp_path):
    out = tmp_path / "labels.json"
    assert main(["label", "--annotation", str(annotation), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["columns"] == list(OBSERVATIONS)
    assert doc["codes"] == {"1": "positive", "0": "negative", "-1": "uncertain", "-2": "not mentioned"}
    assert list(doc["labels"]) == ["s1", "s2", "s3", "s4"]
    s1, s3 = doc["labels"]["s1"], doc["labels"]["s3"]
    assert s1[col("Cardiomegaly")] == 1 and s1[col("Pleural Effusion")] == 0 and s1[col("No Finding")] == -2
    assert s3[col("Pneumonia")] == -1
    assert doc["labels"]["s2"][col("No Finding")] == 1


def test_split_selection_and_binary_form(annotation, tmp_path):
    out = tmp_path / "labels_14.json"
    assert main(["label", "--annotation", str(annotation), "--split", "train,val", "--binary", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"_note", "columns", "labels"} and list(doc["labels"]) == ["s1", "s2", "s3"]
    assert doc["labels"]["s3"][col("Pneumonia")] == 1  # uncertain counts as positive
    assert doc["labels"]["s1"][col("Pleural Effusion")] == 0
    assert set(v for row in doc["labels"].values() for v in row) <= {0, 1}


def test_refuses_to_overwrite_without_flag(annotation, tmp_path, capsys):
    out = tmp_path / "labels.json"
    out.write_text("keep me")
    assert main(["label", "--annotation", str(annotation), "--out", str(out)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["label", "--annotation", str(annotation), "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["labels"]
    # a folder is never a labels file, with or without --overwrite
    for flags in ([], ["--overwrite"]):
        assert main(["label", "--annotation", str(annotation), "--out", str(tmp_path), *flags]) == 1
        assert f"{tmp_path}: is a folder; give a file name" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON at line 1"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"train": {"id": "x"}}), "split 'train' must be a list"),
    (json.dumps({"train": [{"id": "x"}]}), "study x: field 'report': missing"),
    (json.dumps({"train": [{"id": "x", "report": 3}]}), "study x: field 'report': must be a string, not int"),
    (json.dumps({"train": [{"report": "a"}]}), "field 'id': entry train[0] has no string id"),
    (json.dumps({"train": [{"id": "x", "report": "a"}], "val": [{"id": "x", "report": "b"}]}),
     "study x: field 'id': duplicate id"),
])
def test_bad_annotation_is_one_line_naming_file_and_field(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "labels.json"
    assert main(["label", "--annotation", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and message in err
    assert not out.exists()


def test_unknown_split_and_missing_file(annotation, tmp_path, capsys):
    out = tmp_path / "labels.json"
    assert main(["label", "--annotation", str(annotation), "--split", "train,dev", "--out", str(out)]) == 1
    assert "no split 'dev' (the file has: train, val, test)" in capsys.readouterr().err
    assert main(["label", "--annotation", str(tmp_path / "none.json"), "--out", str(out)]) == 1
    assert "none.json: file not found" in capsys.readouterr().err


def test_text_table_and_explain(capsys):
    assert main(["label", "--text", "Mild cardiomegaly. No pleural effusion."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(OBSERVATIONS)
    table = {line[:27].strip(): line[27:].split()[0] for line in lines}
    assert table["Cardiomegaly"] == "positive" and table["Pleural Effusion"] == "negative"
    assert main(["label", "--text", "No pleural effusion.", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "pre-negation cue 'no'" in out and "\"No pleural effusion\"" in out


@pytest.mark.parametrize("argv, message", [
    (["label", "--annotation", "a.json"], "--annotation needs --out"),
    (["label", "--text", "x", "--binary"], "--out and --binary go with --annotation"),
    (["label", "--text", "x", "--labeler", "chexbert"], "needs --chexbert-ckpt FILE and --bert-dir DIR"),
    (["label", "--text", "x", "--bert-dir", "b"], "only with --labeler chexbert"),
    (["label", "--text", "  "], "--text: the report is empty"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_chexbert_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    argv = ["label", "--text", "x", "--labeler", "chexbert", "--chexbert-ckpt", str(tmp_path / "chexbert.pth"),
            "--bert-dir", str(tmp_path)]
    assert main(argv) == 1
    assert "CheXbert checkpoint not found" in capsys.readouterr().err
