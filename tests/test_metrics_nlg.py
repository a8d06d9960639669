"""NLG metrics: identical to direct pycocoevalcap calls, plus the inputs that break research code."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from ifnet.data.tokenizer import clean_report_iu_xray
from ifnet.metrics import (NLG_KEYS, NLG_METRICS, MeteorUnavailable, ScoringInputError, compute_scores,
                           get_meteor, get_text_cleaner, score_reports)
from ifnet.metrics.meteor import MeteorScorer, meteor_text

NLG = list(NLG_METRICS)


def direct_pycocoevalcap(gts: dict, res: dict, meteor: Meteor) -> dict:
    """R2Gen's modules/metrics.py, written out: the reference we must match bit for bit."""
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU_{n + 1}": bleu[n] for n in range(4)})
    out["METEOR"], _ = meteor.compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


@pytest.fixture(scope="module")
def direct_meteor():
    """pycocoevalcap's own Meteor, independent of ours (its own JVM)."""
    meteor = Meteor()
    yield meteor
    del meteor  # its __del__ stops the JVM


@pytest.fixture(scope="module")
def iu_clean(iu_annotation_path: Path) -> dict:
    """40 IU-Xray test reports, already cleaned the R2Gen way (single spaces)."""
    test = json.loads(iu_annotation_path.read_text())["test"][:40]
    return {s["id"]: " ".join(clean_report_iu_xray(s["report"]).split()) for s in test}


def test_equals_direct_pycocoevalcap_on_clean_text(iu_clean, direct_meteor):
    ids = list(iu_clean)
    refs = iu_clean
    # A system that copies the previous study's report, except every fifth study which it gets right.
    hyps = {sid: iu_clean[sid] if i % 5 == 0 else iu_clean[ids[i - 1]] for i, sid in enumerate(ids)}
    gts = {i: [refs[sid]] for i, sid in enumerate(ids)}
    res = {i: [hyps[sid]] for i, sid in enumerate(ids)}
    expected = direct_pycocoevalcap(gts, res, direct_meteor)

    for cleaner in ("iu_xray", "mimic_cxr", None):  # cleaning clean text changes nothing
        scores = compute_scores(refs, hyps, cleaner=cleaner, metrics=NLG)
        assert scores == expected  # exact float equality, every key
    assert list(expected) == list(NLG_KEYS)


def test_cleaning_is_applied_when_asked():
    raw_refs = {"s1": "The heart is normal. The lungs are clear.", "s2": "1. No effusion.. 2. Mild cardiomegaly."}
    raw_hyps = {"s1": "The heart is normal.", "s2": "Mild   cardiomegaly. No\neffusion."}
    prepare = get_text_cleaner("iu_xray")
    clean_refs = {k: prepare(v) for k, v in raw_refs.items()}
    clean_hyps = {k: prepare(v) for k, v in raw_hyps.items()}
    assert clean_refs["s2"] == "no effusion . mild cardiomegaly ."
    assert clean_hyps["s2"] == "mild cardiomegaly . no effusion ."

    cleaned = compute_scores(raw_refs, raw_hyps, metrics=NLG)
    assert cleaned == compute_scores(clean_refs, clean_hyps, cleaner=None, metrics=NLG)
    # Not cleaning keeps "normal." as one token, so BLEU differs.
    assert compute_scores(raw_refs, raw_hyps, cleaner=None, metrics=["BLEU"])["BLEU_1"] != cleaned["BLEU_1"]


def test_cleaning_then_folding_is_idempotent(iu_clean):
    prepare = get_text_cleaner("iu_xray")
    for text in iu_clean.values():
        assert prepare(text) == text
    assert prepare("clear. . normal.") == "clear . . normal ."  # R2Gen's empty sentence, single-spaced


@pytest.mark.parametrize("cleaner", ["iu_xray", "mimic_cxr", "none"])
@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab12. \n,;:()[]-_'/?XÉ—|")), max_size=50) | st.text(max_size=30))
def test_prepared_text_is_a_fixed_point(cleaner, text):
    # What "already clean" means: preparing it again changes nothing, so scores equal direct calls.
    prepare = get_text_cleaner(cleaner)
    once = prepare(text)
    assert prepare(once) == once
    assert "\n" not in once and "  " not in once


def test_empty_hypothesis_scores_zero_and_matches_pycocoevalcap(direct_meteor):
    refs = {"a": "the heart is normal . the lungs are clear .", "b": "no pleural effusion ."}
    for empty in ("", "   \n "):
        report = score_reports(refs, {"a": "the heart is normal .", "b": empty}, metrics=NLG)
        row = report.per_study[1]
        assert row["hypothesis"] == ""  # not cleaned into "."
        assert all(row[key] == 0.0 for key in NLG_KEYS)
        gts = {0: [refs["a"]], 1: [refs["b"]]}
        res = {0: ["the heart is normal ."], 1: [""]}
        assert report.scores == direct_pycocoevalcap(gts, res, direct_meteor)
    all_empty = compute_scores(refs, {"a": "", "b": ""}, metrics=NLG)
    assert all(v == 0.0 for v in all_empty.values())


def test_non_ascii_text(direct_meteor):
    text = "pleural effusion — café ≥ 2 cm ."
    refs = {"x": text, "y": "no acute disease ."}
    hyps = {"x": text, "y": "pleural effusion — cafe 2 cm ."}
    report = score_reports(refs, hyps, cleaner=None, metrics=NLG)
    assert report.per_study[0]["METEOR"] == pytest.approx(1.0)
    assert report.per_study[0]["BLEU_4"] == pytest.approx(1.0)
    gts = {0: [text], 1: ["no acute disease ."]}
    res = {0: [text], 1: [hyps["y"]]}
    assert report.scores == direct_pycocoevalcap(gts, res, direct_meteor)
    # and through R2Gen's cleaning, which keeps the non-ASCII characters
    assert compute_scores(refs, hyps, metrics=["METEOR"])["METEOR"] > 0


def test_meteor_text_makes_protocol_safe_lines():
    assert meteor_text("a\nb\r\nc\td  e") == "a b c d e"
    assert meteor_text("left ||| right") == "left right"
    assert meteor_text("lone \ud800 surrogate") == "lone ? surrogate"
    assert meteor_text("already clean .") == "already clean ."


def test_newlines_and_separators_do_not_hang_meteor():
    # With no cleaning, a newline or '|||' reaches the METEOR line protocol; pycocoevalcap alone
    # would desynchronise (newline) or invent extra references ('|||').
    refs = {"a": "no effusion\nheart normal", "b": "left ||| right lung clear"}
    hyps = {"a": "no effusion heart normal", "b": "left right lung clear\n"}
    report = score_reports(refs, hyps, cleaner=None, metrics=["METEOR"])
    assert [row["METEOR"] for row in report.per_study] == [pytest.approx(1.0)] * 2


def test_multiple_references_per_study(direct_meteor):
    refs = {"a": ["the heart is normal .", "normal heart size ."], "b": ["no effusion ."]}
    hyps = {"a": "normal heart size .", "b": ["no effusion ."]}
    gts = {0: refs["a"], 1: refs["b"]}
    res = {0: ["normal heart size ."], 1: ["no effusion ."]}
    assert compute_scores(refs, hyps, cleaner=None, metrics=NLG) == direct_pycocoevalcap(gts, res, direct_meteor)


def test_one_meteor_jvm_per_process_reused():
    first = get_meteor()
    compute_scores({"a": "no effusion ."}, {"a": "no effusion ."}, metrics=["METEOR"])
    assert get_meteor() is first and first.alive


@pytest.mark.parametrize("refs, hyps, message", [
    ({"a": "x .", "b": "y ."}, {"a": "x .", "c": "y ."}, r"1 only in refs \(b\); 1 only in hyps \(c\)"),
    ({"a": "   "}, {"a": "x ."}, "study a: empty reference"),
    ({"a": "x ."}, {"a": ["x .", "y ."]}, "expected one hypothesis, got 2"),
    ({"a": 3}, {"a": "x ."}, "reference of study a: expected a string"),
    ({}, {}, "nothing to score"),
])
def test_input_errors(refs, hyps, message):
    with pytest.raises(ScoringInputError, match=message):
        compute_scores(refs, hyps, metrics=["BLEU"])


def test_option_errors():
    with pytest.raises(ScoringInputError, match="unknown metric"):
        compute_scores({"a": "x ."}, {"a": "x ."}, metrics=["SPICE"])
    with pytest.raises(ScoringInputError, match="unknown cleaner"):
        compute_scores({"a": "x ."}, {"a": "x ."}, cleaner="mimic", metrics=["BLEU"])


def test_id_mismatch_lists_are_truncated():
    refs = {f"r{i}": "x ." for i in range(20)}
    with pytest.raises(ScoringInputError, match=r"20 only in refs \(r0, .*r7, ... and 12 more\)"):
        compute_scores(refs, {"h": "x ."}, metrics=["BLEU"])


def test_missing_java_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    with pytest.raises(MeteorUnavailable, match="METEOR needs Java: install default-jre-headless"):
        MeteorScorer()
    # checked before any metric is computed
    with pytest.raises(MeteorUnavailable, match="no `java` found on PATH"):
        compute_scores({"a": "x ."}, {"a": "x ."})
    # the other metrics do not need Java
    assert compute_scores({"a": "x y ."}, {"a": "x y ."}, metrics=["BLEU", "ROUGE_L"])["ROUGE_L"] == 1.0


def _fake_java(folder: Path, script: str) -> None:
    java = folder / "java"
    java.write_text("#!/bin/sh\n" + script + "\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)


def test_java_that_dies_is_reported_not_hung(monkeypatch, tmp_path):
    _fake_java(tmp_path, "echo 'Error: Could not reserve enough space for object heap' >&2; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path))
    scorer = MeteorScorer()
    with pytest.raises(MeteorUnavailable, match="Could not reserve enough space"):
        scorer.compute_score({0: ["a b ."]}, {0: ["a b ."]})
    scorer.close()  # after a crash: no deadlock on pycocoevalcap's lock, closing twice is fine


def test_java_that_never_answers_times_out(monkeypatch, tmp_path):
    _fake_java(tmp_path, f"exec {shutil.which('sleep')} 60")
    monkeypatch.setenv("PATH", str(tmp_path))
    scorer = MeteorScorer(timeout_s=1)
    with pytest.raises(MeteorUnavailable, match="no answer within 1 s"):
        scorer.compute_score({0: ["a b ."]}, {0: ["a b ."]})


def test_cli_without_java_exits_with_one_line(tmp_path):
    refs, hyps = tmp_path / "refs.json", tmp_path / "hyps.json"
    refs.write_text(json.dumps({"a": "the heart is normal ."}))
    hyps.write_text(json.dumps({"a": "the heart is normal ."}))
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin)}
    cmd = [sys.executable, "-m", "ifnet", "score", "--refs", str(refs), "--hyps", str(hyps),
           "--metrics", "BLEU", "METEOR"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("ifnet score: error: no `java` found on PATH. METEOR needs Java")
    proc = subprocess.run(cmd + ["--no-meteor"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BLEU_4" in proc.stdout and "METEOR" not in proc.stdout
