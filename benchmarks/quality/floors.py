"""Floors and probes of the quality benchmark (the library code is ifnet.baselines)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ifnet.baselines import (LogisticProbe, apply_thresholds, choose_thresholds, label_scores,
                             most_frequent_report, nearest_neighbours, roc_auc)

#: L2 strengths tried for the probe; the one with the best validation mean AUC is kept.
PROBE_L2 = (0.01, 0.1, 1.0)


def constant_floor(train_reports: Sequence[str], test_ids: Sequence[str]) -> tuple[dict[str, str], str]:
    report = most_frequent_report(list(train_reports))
    return {sid: report for sid in test_ids}, report


def retrieval_floor(train_x: np.ndarray, train_reports: Sequence[str], test_x: np.ndarray,
                    test_ids: Sequence[str]) -> dict[str, str]:
    idx = nearest_neighbours(train_x, test_x, center=True)
    return {sid: train_reports[i] for sid, i in zip(test_ids, idx)}


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              l2s: Sequence[float] = PROBE_L2) -> tuple[LogisticProbe, np.ndarray, float, dict[str, float]]:
    """Fit the label probe for each L2 in ``l2s``; keep the best by validation mean AUC.
    Returns (probe, its validation probabilities, its L2, validation mean AUC per L2)."""
    tried = {}
    best = None
    for l2 in l2s:
        probe = LogisticProbe(l2=l2, max_iter=100).fit(x_train, y_train)
        pv = probe.predict_proba(x_val)
        score = float(np.nanmean([roc_auc(y_val[:, j], pv[:, j]) for j in range(y_val.shape[1])]))
        tried[str(l2)] = score
        if best is None or score > best[0]:
            best = (score, l2, probe, pv)
    _, l2, probe, pv = best
    return probe, pv, l2, tried


def run_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              x_test: np.ndarray, y_test: np.ndarray, subsets: dict[str, np.ndarray]) -> dict:
    """Fit on train for each L2 in PROBE_L2, keep the best by validation mean AUC, thresholds from
    validation, score test (all studies and each boolean ``subsets`` mask) on the 14 labels directly."""
    t0 = time.time()
    probe, pv, l2, tried = fit_probe(x_train, y_train, x_val, y_val)
    choice = choose_thresholds(y_val, pv, y_train.mean(0))
    pt = probe.predict_proba(x_test)
    pred = apply_thresholds(pt, choice.thresholds)
    out = {"l2": l2, "val_mean_auc_by_l2": tried, "thresholds": choice.as_dict(),
           "val": _strip(label_scores(y_val, apply_thresholds(pv, choice.thresholds), pv)),
           "test": label_scores(y_test, pred, pt),
           "seconds": time.time() - t0}
    for name, mask in subsets.items():
        out[f"test_{name}"] = _strip(label_scores(y_test[mask], pred[mask], pt[mask]))
        out[f"test_{name}"]["n"] = int(mask.sum())
    return out


def _strip(scores: dict) -> dict:
    """Summary numbers only (no per-observation table)."""
    return {k: v for k, v in scores.items() if k != "per_observation"}
