"""Floors and label probe (ifnet.baselines) on tiny hand-made data with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ifnet.baselines import (LogisticProbe, apply_thresholds, choose_thresholds, cross_fitted_thresholds, label_scores,
                             most_frequent_report, nearest_neighbours, roc_auc)
from ifnet.labels import NUM_OBSERVATIONS


# -- constant report ----------------------------------------------------------------------------------

def test_most_frequent_report_counts_cleaned_text_and_returns_an_original():
    reports = ["Heart normal. Lungs clear.", "No effusion.", "HEART NORMAL. Lungs clear", "No effusion."]
    # Cleaned, the first and third are the same report (2 copies); "No effusion." also has 2: tie -> first seen.
    assert most_frequent_report(reports) == "Heart normal. Lungs clear."
    assert most_frequent_report(reports + ["No effusion."]) == "No effusion."


def test_most_frequent_report_without_cleaning_and_empty_input():
    assert most_frequent_report(["A.", "a .", "a ."], cleaner=None) == "a ."
    with pytest.raises(ValueError):
        most_frequent_report([])


# -- retrieval ----------------------------------------------------------------------------------------

def test_nearest_neighbours_cosine_without_centering():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = np.array([[10.0, 0.5], [0.1, 3.0], [2.0, 2.1]])
    assert nearest_neighbours(train, query, center=False).tolist() == [0, 1, 2]


def test_nearest_neighbours_centering_removes_the_common_component():
    # All rows share a large offset (like CNN features); raw cosine calls everything alike, centred
    # cosine sees the small differences that distinguish them.
    offset = np.array([100.0, 100.0])
    train = offset + np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    query = offset + np.array([[0.0, 0.9]])
    assert nearest_neighbours(train, query, center=True).tolist() == [1]


def test_nearest_neighbours_exclude_self_and_ties():
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_neighbours(train, train, center=False, exclude_self=True).tolist() == [1, 0, 0]
    assert nearest_neighbours(train, np.array([[1.0, 0.0]]), center=False).tolist() == [0]  # tie -> lower index
    with pytest.raises(ValueError):
        nearest_neighbours(train, np.zeros((1, 3)))


# -- probe --------------------------------------------------------------------------------------------

def test_probe_learns_a_separable_label_and_ignores_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + 0.1 * rng.normal(size=200) > 0.5)], axis=1).astype(float)
    probe = LogisticProbe(l2=1e-3).fit(x, y)
    p = probe.predict_proba(np.array([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, -2.0, 0.0]]))
    assert p[0, 0] > 0.95 and p[1, 0] < 0.05
    assert p[2, 1] > 0.9 and p[3, 1] < 0.1
    # Feature 2 is noise for both labels: its standardised weights are small next to the real ones.
    assert abs(probe.weight[2, 0]) < 0.2 * abs(probe.weight[0, 0])


def test_probe_regularisation_shrinks_weights_and_label_never_positive_stays_low():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 2))
    y = np.stack([(x[:, 0] > 0), np.zeros(100)], axis=1).astype(float)
    weak = LogisticProbe(l2=1e-4).fit(x, y)
    strong = LogisticProbe(l2=10.0).fit(x, y)
    assert abs(strong.weight[0, 0]) < abs(weak.weight[0, 0])
    assert (weak.predict_proba(x)[:, 1] < 0.01).all()


def test_probe_l2_objective_matches_closed_form_for_constant_feature():
    # One constant feature (standardised to zero): only the bias moves, to the log-odds of the prevalence.
    x = np.ones((8, 1))
    y = np.array([[1], [1], [0], [0], [0], [0], [0], [0]], dtype=float)
    p = LogisticProbe(l2=1.0).fit(x, y).predict_proba(x)
    assert np.allclose(p, 0.25, atol=1e-6)


def test_probe_rejects_bad_input():
    with pytest.raises(ValueError):
        LogisticProbe().fit(np.zeros((3, 2)), np.array([[0.5], [1], [0]]))
    with pytest.raises(RuntimeError):
        LogisticProbe().predict_proba(np.zeros((1, 2)))


# -- thresholds ---------------------------------------------------------------------------------------

def test_f1_threshold_on_hand_computed_case():
    # Scores descending: 0.9(1) 0.8(0) 0.7(1) 0.6(1) 0.2(0). F1 cutting after top k:
    # k=1: 2/(1+3)=0.5; k=2: 2/5=0.4; k=3: 4/6=0.667; k=4: 6/7=0.857; k=5: 6/8=0.75 -> k=4, midpoint 0.4.
    y = np.array([[1], [0], [1], [1], [0]])
    p = np.array([[0.9], [0.8], [0.7], [0.6], [0.2]])
    choice = choose_thresholds(y, p, np.array([0.5]), min_positives=1)
    assert choice.methods == ("f1",)
    assert choice.thresholds[0] == pytest.approx(0.4)
    assert apply_thresholds(p, choice.thresholds)[:, 0].tolist() == [1, 1, 1, 1, 0]


def test_f1_threshold_does_not_split_tied_scores_and_prefers_fewer_positives_on_f1_ties():
    y = np.array([[1], [0], [0], [0]])
    p = np.array([[0.5], [0.5], [0.1], [0.0]])
    # Only cuts between distinct scores: {0.5, 0.5} together gives F1 2/3; nothing better.
    t = choose_thresholds(y, p, np.array([0.2]), min_positives=1).thresholds[0]
    assert t == pytest.approx(0.3)
    y2 = np.array([[1], [0], [1], [0]])
    p2 = np.array([[0.9], [0.8], [0.7], [0.1]])
    # F1: k=1 2/3, k=2 2/4, k=3 4/5, k=4 4/6 -> k=3 (0.4).
    assert choose_thresholds(y2, p2, np.array([0.5]), min_positives=1).thresholds[0] == pytest.approx(0.4)


def test_rare_labels_fall_back_to_training_prevalence():
    # 10 validation studies, one positive: fewer than min_positives, so the threshold marks
    # round(0.2 * 10) = 2 studies positive, the train prevalence, whatever the one positive scored.
    p = np.linspace(0.0, 0.9, 10)[:, None]
    y = np.zeros((10, 1), dtype=int)
    y[3] = 1
    choice = choose_thresholds(y, p, np.array([0.2]), min_positives=3)
    assert choice.methods == ("prevalence",)
    assert choice.val_positives == (1,)
    assert apply_thresholds(p, choice.thresholds)[:, 0].sum() == 2
    assert apply_thresholds(p, choice.thresholds)[-2:, 0].tolist() == [1, 1]
    zero = choose_thresholds(y, p, np.array([0.0]), min_positives=3)
    assert apply_thresholds(p, zero.thresholds).sum() == 0
    assert set(choice.as_dict(["x"])["x"]) == {"threshold", "method", "val_positives"}


def test_choose_thresholds_checks_shapes():
    with pytest.raises(ValueError):
        choose_thresholds(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(3))


def test_cross_fitted_thresholds_cut_each_half_by_the_other_halfs_choice():
    rng = np.random.default_rng(4)
    y = (rng.random((41, 3)) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random((41, 3)) * 0.7, 0, 1)
    prevalence = np.array([0.3, 0.3, 0.01])
    half, chosen = cross_fitted_thresholds(y, p, prevalence, seed=7)
    assert sorted(np.bincount(half)) == [20, 21] and len(chosen) == 2
    for h in (0, 1):
        other = half != h
        np.testing.assert_array_equal(chosen[h], choose_thresholds(y[other], p[other], prevalence).thresholds)
    # the split is a function of the seed alone
    again, _ = cross_fitted_thresholds(1 - y, p, prevalence, seed=7)
    np.testing.assert_array_equal(half, again)
    with pytest.raises(ValueError, match="at least 2"):
        cross_fitted_thresholds(y[:1], p[:1], prevalence)


# -- scores -------------------------------------------------------------------------------------------

def test_roc_auc_hand_computed_with_ties_and_degenerate():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # positive 0.5 ties one negative (counts half) and beats the other: (1 + 0.5) / 2.
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_label_scores_macro_micro_and_auc():
    y = np.zeros((4, NUM_OBSERVATIONS), dtype=int)
    pred = np.zeros_like(y)
    y[:, 13] = [1, 1, 0, 0]       # No Finding
    pred[:, 13] = [1, 1, 0, 0]    # perfect: F1 1
    y[:, 1] = [0, 0, 1, 1]        # Cardiomegaly
    pred[:, 1] = [0, 0, 1, 0]     # TP 1, FN 1: F1 2/3
    pred[:, 9] = [1, 0, 0, 0]     # Effusion: FP only -> F1 0
    s = label_scores(y, pred)
    # 12 other observations have F1 0 (zero division gives 0), as in CE.
    assert s["F1_macro"] == pytest.approx((1 + 2 / 3) / 14)
    # Micro over the 13 findings: TP 1, FP 1, FN 1 -> 2/4.
    assert s["F1_micro_13"] == pytest.approx(0.5)
    probs = pred.astype(float)
    probs[:, 1] = [0.1, 0.2, 0.9, 0.3]
    s = label_scores(y, pred, probs)
    assert s["per_observation"]["Cardiomegaly"]["AUC"] == pytest.approx(1.0)
    assert s["auc_observations"] == 2  # only Cardiomegaly and No Finding have both classes
    assert s["mean_auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        label_scores(y[:, :13], pred[:, :13])
