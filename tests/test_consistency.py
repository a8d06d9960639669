"""Report-condition consistency (ifnet.metrics.consistency): what a generated report says vs its condition."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ifnet.labels import BLANK, NEGATIVE, NUM_OBSERVATIONS, OBSERVATIONS, POSITIVE, UNCERTAIN
from ifnet.metrics.consistency import check_reports, compare, condition_codes, consistency_note, summarize

IDX = {name: i for i, name in enumerate(OBSERVATIONS)}


def _vec(*names: str, value: float = 1.0) -> np.ndarray:
    v = np.zeros(NUM_OBSERVATIONS)
    for n in names:
        v[IDX[n]] = value
    return v


def _codes(**named: int) -> np.ndarray:
    row = np.full(NUM_OBSERVATIONS, BLANK)
    for key, code in named.items():
        row[IDX[key.replace("_", " ")]] = code
    return row


def test_compare_lists_unsupported_and_unsaid_findings():
    cond = np.stack([_vec("Cardiomegaly", "Pleural Effusion"), _vec("No Finding")])
    text = np.stack([_codes(Cardiomegaly=POSITIVE, Pneumothorax=UNCERTAIN, Edema=NEGATIVE),
                     _codes(No_Finding=POSITIVE)])
    first, second = compare(cond, text)
    assert first.said == ("Cardiomegaly", "Pneumothorax")
    assert first.unsupported == ("Pneumothorax",) and first.unsaid == ("Pleural Effusion",)
    assert not first.consistent and second.consistent
    assert second.to_json() == {"said": [], "unsupported": [], "unsaid": []}
    # uncertain counted as negative: the hedged pneumothorax is no longer said
    first, _ = compare(cond, text, uncertain="negative")
    assert first.said == ("Cardiomegaly",) and first.unsupported == ()


def test_probability_condition_counts_from_one_half():
    cond = np.stack([_vec("Edema", value=0.5) + _vec("Fracture", value=0.49)])
    assert condition_codes(cond)[0, IDX["Edema"]] == POSITIVE
    assert condition_codes(cond)[0, IDX["Fracture"]] == NEGATIVE
    (study,) = compare(cond, np.stack([_codes()]))
    assert study.unsaid == ("Edema",)


def test_summary_counts_and_macro_over_observations_present():
    cond = np.stack([_vec("Cardiomegaly"), _vec("Cardiomegaly"), _vec("No Finding")])
    text = np.stack([_codes(Cardiomegaly=POSITIVE), _codes(), _codes(No_Finding=POSITIVE, Fracture=POSITIVE)])
    s = summarize(cond, text)
    assert s["studies"] == 3 and s["consistent_reports"] == 1
    assert s["reports_with_unsaid"] == 1 and s["reports_with_unsupported"] == 1
    rows = s["per_observation"]
    assert rows["Cardiomegaly"]["TP"] == 1 and rows["Cardiomegaly"]["FN"] == 1
    assert rows["Fracture"]["FP"] == 1 and rows["No Finding"]["TP"] == 1
    # macro over Cardiomegaly (2/3), Fracture (0) and No Finding (1): the 11 absent on both sides are not misses
    assert s["observations_present"] == ["Cardiomegaly", "Fracture", "No Finding"]
    assert s["F1_macro"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    # micro over all: TP 2, FP 1, FN 1
    assert s["F1_micro"] == pytest.approx(4 / 6)
    assert "1 of 3 reports" in consistency_note(s)


def test_perfect_agreement_scores_one():
    cond = np.stack([_vec("Edema"), _vec("No Finding")])
    text = np.stack([_codes(Edema=POSITIVE), _codes(No_Finding=POSITIVE)])
    s = summarize(cond, text)
    assert s["F1_macro"] == 1.0 and s["F1_micro"] == 1.0 and s["consistent_reports"] == 2


def test_labels_real_text_with_the_project_labeler():
    """A guided sentence that lost its negation asserts three findings its condition does not hold."""
    reports = ["the heart is normal in size . there is a focal airspace consolidation pneumothorax or large "
               "pleural effusion .",
               "the heart is normal in size . the lungs are clear . no pneumothorax or pleural effusion .",
               "the heart is enlarged . no pleural effusion ."]
    cond = np.stack([_vec("Lung Opacity"), _vec("No Finding"), _vec("Cardiomegaly", "Pleural Effusion")])
    studies, summary = check_reports(cond, reports)
    assert set(studies[0].unsupported) >= {"Consolidation", "Pneumothorax", "Pleural Effusion"}
    assert studies[0].unsaid == ("Lung Opacity",) or "Lung Opacity" in studies[0].said
    assert studies[1].consistent
    assert studies[2].said == ("Cardiomegaly",) and studies[2].unsaid == ("Pleural Effusion",)
    assert summary["studies"] == 3 and summary["consistent_reports"] == 1


@pytest.mark.parametrize("condition, message", [
    (np.zeros((2, 13)), "shape [N, 14]"),
    (np.full((1, 14), 1.5), "condition[0, 0] (Enlarged Cardiomediastinum) is 1.5"),
    (np.array([[np.nan] + [0.0] * 13]), "condition[0, 0]"),
])
def test_bad_condition_is_a_clear_error(condition, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compare(condition, np.full((len(condition), NUM_OBSERVATIONS), BLANK))


def test_report_count_must_match_condition_rows():
    with pytest.raises(ValueError, match="2 reports but 1 condition rows"):
        check_reports(np.zeros((1, 14)), ["a .", "b ."])
