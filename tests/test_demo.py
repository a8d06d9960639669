"""`ifnet demo` end to end on a very small phantom sample, and the phantom generator itself."""

import json

import numpy as np
import pytest

from ifnet.cli import main as cli_main
from ifnet.demo.phantom import make_study
from ifnet.labeler import label_reports
from ifnet.labels import OBSERVATIONS, to_binary


def test_phantom_is_deterministic_and_follows_labels():
    a, b = make_study("PX1", seed=5), make_study("PX1", seed=5)
    assert np.array_equal(a.frontal, b.frontal) and a.report == b.report
    normal = np.zeros(14, dtype=int)
    normal[OBSERVATIONS.index("No Finding")] = 1
    big_heart = np.zeros(14, dtype=int)
    big_heart[OBSERVATIONS.index("Cardiomegaly")] = 1
    n, c = make_study("PX2", labels=normal), make_study("PX2", labels=big_heart)
    # same nuisance draws, only the finding differs: the heart region changes, the apices do not
    diff = np.abs(n.frontal.astype(int) - c.frontal.astype(int))
    assert diff[150:210, 100:200].mean() > 5 * max(diff[20:60].mean(), 0.1)
    assert "cardiomegaly" in c.report.lower() or "enlarged" in c.report.lower()
    # the report says what the labels say, as read by our own labeler
    assert to_binary(label_reports([c.report]))[0][OBSERVATIONS.index("Cardiomegaly")] == 1
    assert to_binary(label_reports([n.report]))[0][OBSERVATIONS.index("No Finding")] == 1


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--studies", "24", "6", "6", "--epochs", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_F1_macro", "labeler_micro_F1_13_vs_phantom_truth"):
        assert isinstance(metrics[key], float), key
    assert "not a result on real X-rays" in metrics["note"]
    page = (out / "index.html").read_text()
    assert page.count("class='study'") == 6 and "enhanced (IEC)" in page and "Training curves" in page
    # a second run into the same demo folder replaces it; a non-demo folder is refused
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    assert cli_main(["demo", "--out", str(other), "--studies", "4", "2", "2", "--epochs", "1"]) == 1
    assert (other / "keep.txt").read_text() == "user data"
    # the user's own files that carry the demo's names are never deleted, not even with --overwrite
    theirs = tmp_path / "project"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "precious.txt").write_text("precious")
    (theirs / "index.html").write_text("<p>mine</p>")
    assert cli_main(["demo", "--out", str(theirs), "--studies", "4", "2", "2", "--epochs", "1", "--overwrite"]) == 1
    assert (theirs / "data" / "precious.txt").read_text() == "precious"
    assert (theirs / "index.html").read_text() == "<p>mine</p>" and not (theirs / ".ifnet-demo").exists()
    # --overwrite writes the demo's entries into it and touches nothing else; a rerun into a demo folder replaces
    # only what the demo wrote, even the user's notes put there stay
    assert cli_main(["demo", "--out", str(other), "--studies", "4", "2", "2", "--epochs", "1", "--overwrite"]) == 0
    assert (other / "keep.txt").read_text() == "user data" and (other / "metrics.json").is_file()
    (out / "my_notes.txt").write_text("notes")
    (out / "run" / "stale.txt").write_text("from the earlier run")
    assert cli_main(["demo", "--out", str(out), "--studies", "4", "2", "2", "--epochs", "1"]) == 0
    assert (out / "my_notes.txt").read_text() == "notes" and not (out / "run" / "stale.txt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--studies", "0", "2", "2"], "--studies: every split needs at least one study, got 0 2 2"),
    (["--studies", "4", "2", "0"], "--studies: every split needs at least one study"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
])
def test_bad_demo_options_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "d"
    assert cli_main(["demo", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert cli_main(["demo", "--out", str(afile)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and afile.read_text() == "mine"
