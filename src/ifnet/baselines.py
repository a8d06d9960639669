"""Floors and a label probe for honest report-generation benchmarks.

A generated report is only worth something if it beats what needs no model, or no image:

* :func:`most_frequent_report` - one constant report for every study (the most frequent train report);
* :func:`nearest_neighbours` - retrieval: the report of the train study whose image features are closest;
* (the text-only floor is the model itself trained and decoded on blanked images; see the benchmark).

And an upper reference for clinical efficacy (CE), the **label probe**: logistic regression on the same
image features, predicting the 14 observations directly (:class:`LogisticProbe`). It tells how much of
each finding the features carry; a generator conditioned on those features should say about as much.

Thresholds turn probabilities into 0/1 findings. :func:`choose_thresholds` picks them on validation data
only, per observation: the F1-maximising threshold where validation has enough positives, otherwise the
threshold at which the validation positive rate equals the training prevalence (with one or two positives
the F1-optimal threshold is fitted to those studies alone; matching the prior rate is stabler).

:func:`label_scores` scores 0/1 predictions against 0/1 truth with the same definitions as CE
(:mod:`ifnet.metrics.clinical`: zero division gives 0, macro over the 14 observations), plus micro-F1 over
the 13 findings and ROC AUC per observation.

Everything here is numpy (and torch for the probe's optimiser), small and tested on hand-made data in
``tests/test_baselines.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ifnet.labels import FINDINGS, NUM_OBSERVATIONS, OBSERVATIONS

__all__ = [
    "most_frequent_report", "nearest_neighbours", "LogisticProbe", "ThresholdChoice", "choose_thresholds",
    "apply_thresholds", "roc_auc", "label_scores",
]


# -- floors ----------------------------------------------------------------------------------------

def most_frequent_report(reports: Sequence[str], cleaner: Optional[str] = "iu_xray") -> str:
    """The report that occurs most often in ``reports`` after cleaning (R2Gen's cleaner by default).

    Counting cleaned text merges copies that differ only in case or punctuation. Ties go to the report
    seen first. Returns the first original (uncleaned) report with the winning cleaned form.
    """
    if not reports:
        raise ValueError("most_frequent_report needs at least one report")
    from ifnet.data.tokenizer import get_cleaner

    clean = get_cleaner(cleaner) if cleaner not in (None, "none") else (lambda s: s)
    cleaned = [clean(r) for r in reports]
    winner, _ = Counter(cleaned).most_common(1)[0]  # most_common keeps first-seen order among ties
    return reports[cleaned.index(winner)]


def nearest_neighbours(train: np.ndarray, query: np.ndarray, *, center: bool = True,
                       exclude_self: bool = False) -> np.ndarray:
    """Index into ``train [N, D]`` of the nearest row to each ``query [M, D]`` row, by cosine similarity.

    ``center`` subtracts the train mean first: CNN features share a large common component, and cosine on
    raw features mostly measures it. ``exclude_self`` (query is train itself) forbids i -> i.
    Ties go to the lower index.
    """
    train = np.asarray(train, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"train [N, D] and query [M, D] must share D, got {train.shape} and {query.shape}")
    if len(train) == 0:
        raise ValueError("nearest_neighbours needs at least one train row")
    if center:
        mean = train.mean(axis=0, keepdims=True)
        train, query = train - mean, query - mean
    tn = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    qn = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    sim = qn @ tn.T
    if exclude_self:
        if len(train) != len(query):
            raise ValueError("exclude_self needs query to be the train rows themselves")
        np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)  # first maximum: the lower index wins ties


# -- the label probe ---------------------------------------------------------------------------------

@dataclass
class LogisticProbe:
    """Independent L2-regularised logistic regressions, one per label, on standardised features.

    ``fit(x [N, D], y [N, L])``, then ``predict_proba(x) -> [M, L]``. The loss per label is the mean
    binary cross-entropy plus ``l2 / 2 * ||w||^2`` (bias not penalised), minimised with full-batch L-BFGS;
    it is convex, so the result does not depend on the seed. ``l2`` is chosen by the caller on validation
    data. Features are standardised with the training mean and standard deviation.
    """

    l2: float = 1e-2
    max_iter: int = 200
    weight: Optional[np.ndarray] = field(default=None, repr=False)  # [D, L] after fit
    bias: Optional[np.ndarray] = field(default=None, repr=False)  # [L]
    mean: Optional[np.ndarray] = field(default=None, repr=False)
    scale: Optional[np.ndarray] = field(default=None, repr=False)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LogisticProbe":
        import torch

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"x [N, D] and y [N, L] must have the same N, got {x.shape} and {y.shape}")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("y must hold 0/1 labels")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        self.mean = x.mean(axis=0)
        self.scale = np.where(x.std(axis=0) > 1e-8, x.std(axis=0), 1.0)
        xt = torch.from_numpy((x - self.mean) / self.scale)
        yt = torch.from_numpy(y)
        w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
        # Start the bias at the prior log-odds: a label never positive in train then stays near 0 probability.
        prior = np.clip(y.mean(axis=0), 1e-4, 1 - 1e-4)
        b = torch.tensor(np.log(prior / (1 - prior)), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> "torch.Tensor":
            opt.zero_grad()
            logits = xt @ w + b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none").mean(0).sum()
            loss = loss + 0.5 * self.l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach().numpy(), b.detach().numpy()
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        if self.weight is None:
            raise RuntimeError("LogisticProbe: call fit() first")
        x = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self.decision_function(x)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


# -- thresholds --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdChoice:
    """Per-label thresholds and how each was chosen ("f1" or "prevalence")."""

    thresholds: np.ndarray  # [L]
    methods: tuple[str, ...]
    val_positives: tuple[int, ...]

    def as_dict(self, names: Sequence[str] = OBSERVATIONS) -> dict:
        return {n: {"threshold": float(t), "method": m, "val_positives": int(p)}
                for n, t, m, p in zip(names, self.thresholds, self.methods, self.val_positives)}


def _f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising F1 of ``p >= t`` on (y, p). Between two distinct scores it returns the
    midpoint, so a study scoring just below the chosen cut is not a coin flip. Ties in F1 go to the
    higher threshold (fewer positives)."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    k = np.arange(1, len(ps) + 1)  # predicted positives if we cut after position k-1
    total = ys.sum()
    f1 = 2 * tp / (k + total)
    # Only cut where the next score differs (a threshold cannot split equal scores).
    valid = np.r_[ps[:-1] > ps[1:], True]
    f1 = np.where(valid, f1, -1.0)
    best = int(np.argmax(f1))  # first maximum = fewest predicted positives
    if best + 1 < len(ps):
        return float((ps[best] + ps[best + 1]) / 2)
    return float(ps[best] - 1e-12) if ps[best] > 0 else 0.0


def _rate_threshold(p: np.ndarray, rate: float) -> float:
    """The threshold that marks about ``rate`` of the studies positive (at least one above zero rate)."""
    n = len(p)
    k = int(round(rate * n))
    if k <= 0:
        return float(np.nextafter(p.max(), np.inf))  # nobody positive
    if k >= n:
        return float(p.min())
    s = np.sort(p)[::-1]
    return float((s[k - 1] + s[k]) / 2) if s[k - 1] > s[k] else float(s[k - 1])


def choose_thresholds(y_val: np.ndarray, p_val: np.ndarray, train_prevalence: np.ndarray, *,
                      min_positives: int = 5) -> ThresholdChoice:
    """Per-label thresholds from validation labels ``y_val [N, L]`` and probabilities ``p_val [N, L]``.

    A label with at least ``min_positives`` validation positives gets the F1-maximising threshold (see
    :func:`_f1_threshold`); one with fewer gets the threshold at which the validation positive rate equals
    ``train_prevalence`` (the label's positive fraction in the training labels).
    """
    y_val = np.asarray(y_val)
    p_val = np.asarray(p_val, dtype=np.float64)
    prev = np.asarray(train_prevalence, dtype=np.float64)
    if y_val.shape != p_val.shape or y_val.ndim != 2 or prev.shape != (y_val.shape[1],):
        raise ValueError(f"y_val and p_val must be [N, L] and train_prevalence [L]; got {y_val.shape}, "
                         f"{p_val.shape}, {prev.shape}")
    thresholds, methods, positives = [], [], []
    for j in range(y_val.shape[1]):
        y, p = y_val[:, j] > 0.5, p_val[:, j]
        n_pos = int(y.sum())
        positives.append(n_pos)
        if n_pos >= min_positives:
            thresholds.append(_f1_threshold(y.astype(np.float64), p))
            methods.append("f1")
        else:
            thresholds.append(_rate_threshold(p, float(prev[j])))
            methods.append("prevalence")
    return ThresholdChoice(np.asarray(thresholds), tuple(methods), tuple(positives))


def cross_fitted_thresholds(y_val: np.ndarray, p_val: np.ndarray, train_prevalence: np.ndarray, *,
                            seed: int = 0, min_positives: int = 5) -> tuple[np.ndarray, list[np.ndarray]]:
    """Thresholds for scoring validation on studies they were not fitted to: validation is split into two
    halves (a permutation drawn from ``seed``), and each half gets the :func:`choose_thresholds` choice made
    on the other. Returns ``(half [N] in {0, 1}, [thresholds for half 0, thresholds for half 1])``.
    """
    y_val, p_val = np.asarray(y_val), np.asarray(p_val)
    n = len(y_val)
    if n < 2:
        raise ValueError(f"cross-fitted thresholds need at least 2 validation studies, got {n}")
    half = (np.random.default_rng(seed).permutation(n) >= n // 2).astype(np.int64)
    chosen = [choose_thresholds(y_val[half != h], p_val[half != h], train_prevalence,
                                min_positives=min_positives).thresholds for h in (0, 1)]
    return half, chosen


def apply_thresholds(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 ``int64 [N, L]``: probability >= threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds)[None, :]).astype(np.int64)


# -- scores ------------------------------------------------------------------------------------------

def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of scores ``p`` for 0/1 ``y`` (Mann-Whitney, ties count half); NaN without both classes."""
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Average ranks handle ties exactly: AUC = (sum of positive ranks - n_pos(n_pos+1)/2) / (n_pos n_neg).
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def label_scores(y_true: np.ndarray, y_pred: np.ndarray, probs: Optional[np.ndarray] = None) -> dict:
    """Scores of 0/1 predictions ``[N, 14]`` against 0/1 truth, with CE's definitions.

    Returns F1_macro (14 observations), F1_micro_13 (the 13 findings, No Finding left out: it dominates
    the counts), P/R macro, per-observation F1 and support, and with ``probs`` the ROC AUC per observation
    and their mean over the observations that have both classes in ``y_true`` (``mean_auc``; NaN-free).
    """
    from ifnet.metrics.clinical import clinical_efficacy

    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != NUM_OBSERVATIONS:
        raise ValueError(f"y_true and y_pred must both be [N, {NUM_OBSERVATIONS}], got {y_true.shape}, {y_pred.shape}")
    ce = clinical_efficacy(y_true, y_pred)
    ce13 = clinical_efficacy(y_true, y_pred, observations=FINDINGS)
    out = {"F1_macro": ce["F1_macro"], "P_macro": ce["P_macro"], "R_macro": ce["R_macro"],
           "F1_micro_13": ce13["F1_micro"],
           "per_observation": {n: {"F1": v["F1"], "support": v["support"], "TP": v["TP"], "FP": v["FP"]}
                               for n, v in ce["per_observation"].items()}}
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != y_true.shape:
            raise ValueError(f"probs must be {y_true.shape}, got {probs.shape}")
        aucs = [roc_auc(y_true[:, j], probs[:, j]) for j in range(NUM_OBSERVATIONS)]
        for name, a in zip(OBSERVATIONS, aucs):
            out["per_observation"][name]["AUC"] = a
        finite = [a for a in aucs if not math.isnan(a)]
        out["mean_auc"] = float(np.mean(finite)) if finite else math.nan
        out["auc_observations"] = len(finite)
    return out
