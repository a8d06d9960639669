"""Clinical efficacy on hand-made label arrays, with hand-computed expected values."""

import numpy as np
import pytest

from ifnet.labels import BLANK, FIVE_OBSERVATIONS, OBSERVATIONS
from ifnet.metrics import CE_KEYS, CE_KEYS_5, ce_scores, clinical_efficacy


def codes(n: int, **columns: list[int]) -> np.ndarray:
    """[n, 14] codes, BLANK everywhere except the named observations (underscores for spaces)."""
    arr = np.full((n, len(OBSERVATIONS)), BLANK, dtype=np.int8)
    for name, values in columns.items():
        arr[:, OBSERVATIONS.index(name.replace("_", " "))] = values
    return arr


# Four studies, three observations mentioned. Worked by hand in the comments of each test.
REF = codes(4, Cardiomegaly=[1, 1, 0, -1], Edema=[1, -2, -2, -2], Pleural_Effusion=[-1, 0, 1, -2])
HYP = codes(4, Cardiomegaly=[1, 0, 1, -1], Edema=[-2, -2, 1, -2], Pleural_Effusion=[1, -1, -2, -2])


def test_uncertain_as_positive():
    # binary ref: Card 1101, Edema 1000, PE 1010; hyp: Card 1011, Edema 0010, PE 1100
    # Card TP2 FP1 FN1 -> 2/3 each; Edema TP0 FP1 FN1 -> 0; PE TP1 FP1 FN1 -> 1/2 each
    ce = clinical_efficacy(REF, HYP, uncertain="positive")
    assert ce["per_observation"]["Cardiomegaly"] == pytest.approx(
        {"P": 2 / 3, "R": 2 / 3, "F1": 2 / 3, "TP": 2, "FP": 1, "FN": 1, "support": 3})
    assert ce["per_observation"]["Edema"]["F1"] == 0.0
    assert ce["per_observation"]["Pleural Effusion"]["F1"] == pytest.approx(0.5)
    # micro: TP3 FP3 FN3
    assert (ce["P_micro"], ce["R_micro"], ce["F1_micro"]) == pytest.approx((0.5, 0.5, 0.5))
    # macro over 14: the 11 never-mentioned observations count as 0 (zero_division=0)
    assert (ce["P_macro"], ce["R_macro"], ce["F1_macro"]) == pytest.approx(((2 / 3 + 1 / 2) / 14,) * 3)
    assert ce["uncertain"] == "positive"


def test_uncertain_as_negative():
    # binary ref: Card 1100, Edema 1000, PE 0010; hyp: Card 1010, Edema 0010, PE 1000
    # Card TP1 FP1 FN1 -> 1/2; Edema 0; PE TP0 FP1 FN1 -> 0. Micro TP1 FP3 FN3 -> 1/4.
    ce = clinical_efficacy(REF, HYP, uncertain="negative")
    assert (ce["P_micro"], ce["R_micro"], ce["F1_micro"]) == pytest.approx((0.25, 0.25, 0.25))
    assert ce["F1_macro"] == pytest.approx(0.5 / 14)
    assert ce["per_observation"]["Pleural Effusion"]["support"] == 1


def test_five_observation_keys_and_mapping():
    flat = ce_scores(REF, HYP, uncertain="positive")
    assert set(flat) == set(CE_KEYS) | set(CE_KEYS_5) | {"CE_uncertain"}
    assert flat["CE_uncertain"] == "positive"
    # all mentioned observations are among the five, so micro is unchanged; macro divides by 5
    assert flat["CE_F1_micro_5"] == pytest.approx(0.5)
    assert flat["CE_P_macro_5"] == pytest.approx((2 / 3 + 1 / 2) / 5)
    assert ce_scores(REF, HYP, uncertain="negative")["CE_R_macro_5"] == pytest.approx(0.5 / 5)


def test_precision_and_recall_are_not_swapped():
    # Atelectasis: ref 1110, hyp 1001 -> TP1 FP1 FN2: P 1/2, R 1/3, F1 2/5
    ce = clinical_efficacy(codes(4, Atelectasis=[1, 1, 1, 0]), codes(4, Atelectasis=[1, -2, 0, 1]),
                           observations=FIVE_OBSERVATIONS)
    assert (ce["P_micro"], ce["R_micro"], ce["F1_micro"]) == pytest.approx((1 / 2, 1 / 3, 2 / 5))
    assert ce["P_macro"] == pytest.approx(0.5 / 5)


def test_macro_f1_is_mean_of_f1s_not_f1_of_means():
    # Cardiomegaly perfect (F1 1), Edema: ref 11, hyp 00 -> F1 0. Restricted to those two.
    ref = codes(2, Cardiomegaly=[1, 0], Edema=[1, 1])
    hyp = codes(2, Cardiomegaly=[1, 0], Edema=[0, 0])
    ce = clinical_efficacy(ref, hyp, observations=["Cardiomegaly", "Edema"])
    assert ce["F1_macro"] == pytest.approx(0.5)
    assert (ce["P_macro"], ce["R_macro"]) == pytest.approx((0.5, 0.5))


def test_zero_division_counts_as_zero_in_macro():
    # Nothing positive anywhere: every P, R, F1 is 0 (scikit-learn's zero_division=0), not NaN or 1.
    empty = codes(3)
    ce = clinical_efficacy(empty, empty)
    assert [ce[k] for k in ("P_micro", "R_micro", "F1_micro", "P_macro", "R_macro", "F1_macro")] == [0.0] * 6
    # One perfect observation: micro 1, macro 1/14 because the other 13 score 0.
    one = codes(3, Cardiomegaly=[1, 0, -2])
    ce = clinical_efficacy(one, one)
    assert ce["F1_micro"] == 1.0
    assert ce["F1_macro"] == pytest.approx(1 / 14)


def test_accepts_lists_and_other_int_dtypes():
    ce_list = clinical_efficacy(REF.tolist(), HYP.astype(np.int64))
    assert ce_list["F1_micro"] == pytest.approx(0.5)


@pytest.mark.parametrize("ref, hyp, message", [
    (np.zeros((2, 13)), np.zeros((2, 13)), r"shape \[N, 14\]"),
    (codes(2), codes(3), "differ in shape"),
    (codes(2, Edema=[2, 0]), codes(2), r"ref_codes\[0, 4\] \(Edema\) is 2"),
    (codes(2), np.full((2, 14), 0.5), "integer label codes"),
])
def test_rejects_bad_arrays(ref, hyp, message):
    with pytest.raises(ValueError, match=message):
        clinical_efficacy(ref, hyp)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="uncertain must be one of"):
        clinical_efficacy(REF, HYP, uncertain="ignore")
    with pytest.raises(ValueError, match="unknown observation"):
        clinical_efficacy(REF, HYP, observations=["Pneumonitis"])
