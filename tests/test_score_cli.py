"""`ifnet score` end to end, with files in tmp_path, through the real dispatcher."""

import csv
import json
from pathlib import Path

import pytest

from ifnet.cli import main
from ifnet.cli.score import format_table
from ifnet.labels import OBSERVATIONS
from ifnet.metrics import SCORE_KEYS, compute_scores

REFS = {
    "s1": "The heart is normal in size. The lungs are clear.",
    "s2": "Mild cardiomegaly. Small left pleural effusion.",
    "s3": "No acute cardiopulmonary abnormality. Possible atelectasis at the bases.",
}
HYPS = {
    "s1": "the heart is normal in size . the lungs are clear .",
    "s2": ["mild cardiomegaly . no pleural effusion ."],
    "s3": "",
}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "refs.json", REFS), write(tmp_path / "hyps.json", HYPS)


def test_end_to_end_json_outputs(files, tmp_path, capsys):
    refs, hyps = files
    out, per_study = tmp_path / "res" / "metrics.json", tmp_path / "per_study.json"
    rc = main(["score", "--refs", str(refs), "--hyps", str(hyps), "--out", str(out),
               "--per-study", str(per_study), "--uncertain", "negative"])
    assert rc == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    expected = compute_scores(REFS, HYPS, uncertain="negative")
    assert {k: written[k] for k in expected} == expected
    assert set(SCORE_KEYS) <= set(written)
    assert (written["CE_uncertain"], written["cleaner"], written["num_studies"]) == ("negative", "iu_xray", 3)

    rows = json.loads(per_study.read_text(encoding="utf-8"))
    assert [r["id"] for r in rows] == ["s1", "s2", "s3"]
    assert rows[0]["references"] == ["the heart is normal in size . the lungs are clear ."]
    assert rows[2]["hypothesis"] == "" and rows[2]["BLEU_4"] == 0.0
    assert rows[1]["ref_labels"]["Cardiomegaly"] == 1 and rows[1]["hyp_labels"]["Pleural Effusion"] == 0

    table = capsys.readouterr().out
    assert "BLEU_4" in table and "CIDEr" in table
    ce_lines = [line for line in table.splitlines() if line.startswith("CE_")]
    assert len(ce_lines) == 12 and all("uncertain -> negative" in line for line in ce_lines)


def test_per_study_csv(files, tmp_path):
    refs, hyps = files
    per_study = tmp_path / "per_study.csv"
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps), "--per-study", str(per_study),
                 "--metrics", "BLEU", "ROUGE_L", "CE"]) == 0
    with open(per_study, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["s1", "s2", "s3"]
    assert float(rows[0]["ROUGE_L"]) == 1.0 and "METEOR" not in rows[0]
    assert rows[1]["ref:Cardiomegaly"] == "1"
    assert set(f"hyp:{o}" for o in OBSERVATIONS) <= set(rows[0])


def test_nlg_only_equals_api(files, tmp_path):
    refs, hyps = files
    out = tmp_path / "m.json"
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps), "--out", str(out), "--no-meteor",
                 "--metrics", "BLEU", "METEOR", "CIDEr", "--cleaner", "none"]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    expected = compute_scores(REFS, HYPS, cleaner=None, metrics=["BLEU", "CIDEr"])
    assert {k: written[k] for k in expected} == expected
    assert "METEOR" not in written and "CE_uncertain" not in written


def test_different_ids_are_listed(tmp_path, capsys):
    refs = write(tmp_path / "refs.json", {f"r{i}": "x ." for i in range(12)} | {"both": "x ."})
    hyps = write(tmp_path / "hyps.json", {"both": "x .", "h1": "y ."})
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps), "--metrics", "BLEU"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"ifnet score: error: {refs} and {hyps} have different study ids: ")
    assert "12 only in " + str(refs) + " (r0, r1, r2, r3, r4, r5, r6, r7, ... and 4 more)" in err
    assert f"1 only in {hyps} (h1)" in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON at line 1"),
    (json.dumps(["a", "b"]), "expected a JSON object {study_id: report}, got JSON array"),
    (json.dumps({}), "no studies in file"),
    (json.dumps({"s1": "ok", "s2": 7, "s3": None}),
     "study s2: value must be a report string or a list of report strings, got JSON number "
     "(and 1 more studies with bad values)"),
    (json.dumps({"s1": []}),
     "study s1: value must be a report string or a list of report strings, got an empty list"),
    (json.dumps({"s1": ["a", 1]}), "got a list holding non-strings"),
    ('{"s1": "x .", "s1": "y ."}', "key 's1' appears twice in one JSON object"),
    (json.dumps({"s1": "   "}), "study s1: empty reference (no words left after cleaning)"),
])
def test_bad_reference_files_name_file_and_study(tmp_path, capsys, content, message):
    refs = tmp_path / "refs.json"
    refs.write_text(content, encoding="utf-8")
    hyps = write(tmp_path / "hyps.json", {"s1": "x ."})
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ifnet score: error: {refs}: ")
    assert message in err and "\n" not in err


def test_hypothesis_list_must_hold_one_report(tmp_path, capsys):
    refs = write(tmp_path / "refs.json", {"s1": "x ."})
    hyps = write(tmp_path / "hyps.json", {"s1": ["x .", "y ."]})
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps)]) == 1
    assert f"{hyps}: study s1: expected one generated report, got a list of 2" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    hyps = write(tmp_path / "hyps.json", {"s1": "x ."})
    assert main(["score", "--refs", str(tmp_path / "nope.json"), "--hyps", str(hyps)]) == 1
    assert f"{tmp_path / 'nope.json'}: file not found" in capsys.readouterr().err


def test_refuses_to_overwrite(files, tmp_path, capsys):
    refs, hyps = files
    out = tmp_path / "metrics.json"
    out.write_text("keep me")
    args = ["score", "--refs", str(refs), "--hyps", str(hyps), "--out", str(out), "--metrics", "BLEU"]
    assert main(args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 0
    assert "BLEU_4" in json.loads(out.read_text())


def test_out_and_per_study_must_be_different_files(files, tmp_path, capsys):
    refs, hyps = files
    out = tmp_path / "scores.json"
    args = ["score", "--refs", str(refs), "--hyps", str(hyps), "--metrics", "BLEU", "--overwrite"]
    assert main(args + ["--out", str(out), "--per-study", str(tmp_path / "." / "scores.json")]) == 2
    assert "--out and --per-study are the same file" in capsys.readouterr().err
    assert not out.exists()


def test_duplicate_hypothesis_ids_and_empty_predictions_reference_name_the_file(tmp_path, capsys):
    refs = write(tmp_path / "refs.json", {"s1": "x ."})
    hyps = tmp_path / "hyps.json"
    hyps.write_text('{"s1": "a .", "s1": "b ."}', encoding="utf-8")
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps)]) == 1
    assert f"{hyps}: key 's1' appears twice" in capsys.readouterr().err
    predictions = write(tmp_path / "predictions.json", [{"id": "s1", "reference": " ", "generated": "a ."}])
    assert main(["score", "--predictions", str(predictions), "--no-meteor"]) == 1
    assert (f"{predictions}: study s1: field 'reference': empty reference (no words left after cleaning)"
            in capsys.readouterr().err)


def test_per_study_needs_a_known_extension(files, tmp_path, capsys):
    refs, hyps = files
    rows = tmp_path / "rows.txt"
    assert main(["score", "--refs", str(refs), "--hyps", str(hyps), "--per-study", str(rows)]) == 1
    assert "use a .json or .csv file name" in capsys.readouterr().err


def test_table_format():
    table = format_table({"BLEU_4": 0.123456, "CE_F1_micro": 0.5, "CE_F1_micro_5": 0.25,
                          "CE_uncertain": "positive"})
    lines = table.splitlines()
    assert lines[1].split() == ["BLEU_4", "0.1235"]
    assert lines[2].endswith("0.5000   14 observations, uncertain -> positive")
    assert lines[3].endswith("0.2500   5 observations, uncertain -> positive")


def test_rescores_the_predictions_file_of_evaluate(tmp_path, capsys):
    hyps = {k: v if isinstance(v, str) else v[0] for k, v in HYPS.items()}
    rows = [{"id": k, "generated": hyps[k], "reference": REFS[k], "predicted_findings": {}} for k in REFS]
    preds = write(tmp_path / "predictions.json", rows)
    out = tmp_path / "m.json"
    assert main(["score", "--predictions", str(preds), "--out", str(out), "--no-meteor"]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    expected = compute_scores(REFS, hyps, metrics=["BLEU", "ROUGE_L", "CIDEr", "CE"])
    assert {k: written[k] for k in expected} == expected and written["num_studies"] == 3
    capsys.readouterr()
    # a record without its reference names file and study; mixing the two input styles is a usage error
    del rows[1]["reference"]
    write(preds, rows)
    assert main(["score", "--predictions", str(preds), "--no-meteor"]) == 1
    err = capsys.readouterr().err.strip()
    assert "predictions.json" in err and "s2" in err and "'reference'" in err and "\n" not in err
    assert main(["score", "--predictions", str(preds), "--refs", str(preds)]) == 2
    assert "give --refs and --hyps, or --predictions" in capsys.readouterr().err
    assert main(["score", "--refs", str(preds)]) == 2
