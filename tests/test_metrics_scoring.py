"""compute_scores with clinical efficacy, through the real report labeler."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ifnet.errors import IFNetError
from ifnet.labeler import label_reports
from ifnet.labels import FIVE_OBSERVATIONS, OBSERVATIONS
from ifnet.metrics import (SCORE_KEYS, ScoringInputError, clinical_efficacy, compute_scores,
                           get_text_cleaner, reference_labels, score_reports)

#: What a lazy system writes for every study: a normal chest, already in R2Gen's cleaned form.
CONSTANT = "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear ."


@pytest.fixture(scope="module")
def iu_test_refs(iu_annotation_path: Path) -> dict:
    return {s["id"]: s["report"] for s in json.loads(iu_annotation_path.read_text())["test"]}


@pytest.mark.parametrize("uncertain", ["positive", "negative"])
def test_constant_report_gets_zero_recall_on_findings_it_never_mentions(iu_test_refs, uncertain):
    hyps = {sid: CONSTANT for sid in iu_test_refs}
    report = score_reports(iu_test_refs, hyps, metrics=["CE"], uncertain=uncertain)
    ref = np.array([[row["ref_labels"][o] for o in OBSERVATIONS] for row in report.per_study])
    hyp = np.array([[row["hyp_labels"][o] for o in OBSERVATIONS] for row in report.per_study])
    assert (hyp == hyp[0]).all()  # one report, one label vector

    ce = clinical_efficacy(ref, hyp, uncertain=uncertain)
    never_predicted = [o for o, p in ce["per_observation"].items() if p["TP"] + p["FP"] == 0]
    assert len(never_predicted) >= 12  # all findings except what "normal" implies
    assert sum(ce["per_observation"][o]["support"] for o in never_predicted) > 0  # not vacuous
    for name in never_predicted:
        assert ce["per_observation"][name]["R"] == 0.0
    # None of the five common observations is ever called positive: recall and precision are 0.
    for key in ("CE_P_micro_5", "CE_R_micro_5", "CE_F1_micro_5", "CE_R_macro_5"):
        assert report.scores[key] == 0.0
    assert report.scores["CE_uncertain"] == uncertain
    # Its only positive is No Finding, so micro recall = No Finding TP / all reference positives.
    nf = ce["per_observation"]["No Finding"]
    total_support = sum(p["support"] for p in ce["per_observation"].values())
    assert report.scores["CE_R_micro"] == pytest.approx(nf["TP"] / total_support)


def test_labels_are_taken_on_the_cleaned_text(iu_test_refs):
    refs = dict(list(iu_test_refs.items())[:30])
    prepare = get_text_cleaner("iu_xray")
    report = score_reports(refs, {k: CONSTANT for k in refs}, metrics=["CE"])
    expected = label_reports([prepare(t) for t in refs.values()])
    got = np.array([[row["ref_labels"][o] for o in OBSERVATIONS] for row in report.per_study])
    assert (got == expected).all()
    assert (reference_labels(refs) == expected).all()


def test_precomputed_reference_labels_give_the_same_scores(iu_test_refs):
    refs = dict(list(iu_test_refs.items())[:50])
    hyps = dict(zip(refs, list(iu_test_refs.values())[1:51]))  # the next study's report
    labelled = compute_scores(refs, hyps, metrics=["CE"])
    codes = reference_labels(refs)
    assert compute_scores(refs, hyps, metrics=["CE"], ref_labels=codes) == labelled
    ids = list(refs)
    by_id = {sid: codes[ids.index(sid)].tolist() for sid in reversed(ids)}  # a dict's order does not matter
    assert compute_scores(refs, hyps, metrics=["CE"], ref_labels=by_id) == labelled


def test_all_keys_with_every_metric():
    refs = {"a": "Mild cardiomegaly. No pleural effusion.", "b": "Small left pleural effusion."}
    hyps = {"a": "mild cardiomegaly . no effusion .", "b": "no acute disease ."}
    scores = compute_scores(refs, hyps)
    assert list(scores) == list(SCORE_KEYS) + ["CE_uncertain"]
    assert all(isinstance(scores[k], float) for k in SCORE_KEYS)
    # a: Cardiomegaly found (TP); b: effusion missed (FN); b's "no acute disease" -> No Finding (FP).
    assert scores["CE_P_micro_5"] == 1.0 and scores["CE_R_micro_5"] == 0.5


def test_ce_errors():
    with pytest.raises(ScoringInputError, match="study a has 2 references; clinical efficacy"):
        compute_scores({"a": ["x .", "y ."]}, {"a": "x ."}, metrics=["CE"])
    with pytest.raises(ScoringInputError, match=r"ref_labels has 1 rows but there are 2 studies"):
        compute_scores({"a": "x .", "b": "y ."}, {"a": "x .", "b": "y ."}, metrics=["CE"],
                       ref_labels=np.zeros((1, 14), dtype=int))
    with pytest.raises(ScoringInputError, match=r"ref_labels has no labels for 1 studies \(b\)"):
        compute_scores({"a": "x .", "b": "y ."}, {"a": "x .", "b": "y ."}, metrics=["CE"],
                       ref_labels={"a": [0] * 14})
    with pytest.raises(ScoringInputError, match=r"ref_labels\[0, 0\].*is 5"):
        compute_scores({"a": "x ."}, {"a": "x ."}, metrics=["CE"], ref_labels=[[5] + [0] * 13])
    with pytest.raises(ScoringInputError, match="uncertain must be one of"):
        compute_scores({"a": "x ."}, {"a": "x ."}, metrics=["CE"], uncertain="ignore")


def test_missing_labeler_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ifnet.labeler", None)  # makes `import ifnet.labeler` fail
    with pytest.raises(IFNetError, match=r"clinical efficacy needs the report labeler"):
        compute_scores({"a": "x ."}, {"a": "x ."}, metrics=["CE"])


def test_ce_key_names_are_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "METRICS.md").read_text(encoding="utf-8")
    for key in SCORE_KEYS + ("CE_uncertain",):
        assert f"`{key}`" in text, key
    assert all(o in text for o in FIVE_OBSERVATIONS)
