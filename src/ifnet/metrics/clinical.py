"""Clinical efficacy (CE): precision, recall and F1 of generated vs reference CheXpert labels.

Pure numpy on label-code arrays [N, 14] (OBSERVATIONS order; codes 1 positive, 0 negative,
-1 uncertain, -2 not mentioned), so it can be checked on hand-made arrays and fed labels from any
labeler.

Definitions (label-based, as R2Gen's and R2GenCMN's ``compute_ce.py`` compute them with
scikit-learn's defaults; those scripts map uncertain to negative):

* Codes become 0/1: positive -> 1, negative and not mentioned -> 0, uncertain -> 1 or 0 according
  to ``uncertain`` ("positive" by default). The same mapping is applied to both sides.
* Per observation c: TP, FP, FN counted over studies; P = TP/(TP+FP), R = TP/(TP+FN),
  F1 = 2TP/(2TP+FP+FN).
* **Zero division gives 0** (scikit-learn's ``zero_division`` default): an observation that is
  never positive in the references and never predicted has P = R = F1 = 0, and it still counts in
  the macro average. This is the rule most published CE tables inherit from scikit-learn.
* Micro: the same formulas on TP, FP, FN summed over observations.
* Macro: the unweighted mean of the per-observation P, R and F1 (macro F1 is the mean of the F1s,
  not the F1 of macro P and macro R).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ifnet.labels import (BLANK, FIVE_OBSERVATIONS, NEGATIVE, NUM_OBSERVATIONS, OBSERVATIONS,
                          POSITIVE, UNCERTAIN, observation_indices, to_binary)

#: How an uncertain (-1) label is counted.
UNCERTAIN_MAPPINGS: tuple[str, ...] = ("positive", "negative")
_VALID_CODES = np.array([POSITIVE, NEGATIVE, UNCERTAIN, BLANK])

#: Result keys for the 14 observations; the 5-observation keys add :data:`FIVE_SUFFIX`.
CE_KEYS: tuple[str, ...] = ("CE_P_micro", "CE_R_micro", "CE_F1_micro",
                            "CE_P_macro", "CE_R_macro", "CE_F1_macro")
FIVE_SUFFIX = "_5"
CE_KEYS_5: tuple[str, ...] = tuple(k + FIVE_SUFFIX for k in CE_KEYS)
#: The key that records the uncertain mapping beside the CE numbers.
CE_UNCERTAIN_KEY = "CE_uncertain"


def check_uncertain(uncertain: str) -> bool:
    """Validate an uncertain mapping name; True when uncertain counts as positive."""
    if uncertain not in UNCERTAIN_MAPPINGS:
        raise ValueError(f"uncertain must be one of {list(UNCERTAIN_MAPPINGS)}, not {uncertain!r}")
    return uncertain == "positive"


def check_codes(codes: Any, name: str = "codes") -> np.ndarray:
    """Return ``codes`` as an int array [N, 14] of CheXpert codes, or raise ValueError saying why."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[1] != NUM_OBSERVATIONS:
        raise ValueError(f"{name} must have shape [N, {NUM_OBSERVATIONS}] (one column per "
                         f"observation), got {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name} must hold integer label codes, got dtype {arr.dtype}")
    bad = ~np.isin(arr, _VALID_CODES)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}[{row}, {col}] ({OBSERVATIONS[col]}) is {arr[row, col].item()!r}; label codes "
                         f"are 1 positive, 0 negative, -1 uncertain, -2 not mentioned")
    return arr.astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def clinical_efficacy(ref_codes: Any, hyp_codes: Any, *, uncertain: str = "positive",
                      observations: Sequence[str] = OBSERVATIONS) -> dict[str, Any]:
    """CE of generated (``hyp_codes``) vs reference (``ref_codes``) labels.

    Args:
        ref_codes, hyp_codes: CheXpert codes [N, 14] in OBSERVATIONS order, row i = study i.
        uncertain: "positive" or "negative": how an uncertain label counts (both sides).
        observations: which observations to average over (e.g. FIVE_OBSERVATIONS).

    Returns:
        {"P_micro", "R_micro", "F1_micro", "P_macro", "R_macro", "F1_macro": float,
         "uncertain": str, "observations": list[str],
         "per_observation": {name: {"P", "R", "F1": float, "TP", "FP", "FN", "support": int}}}
        where support is the number of reference positives.
    """
    as_positive = check_uncertain(uncertain)
    ref = check_codes(ref_codes, "ref_codes")
    hyp = check_codes(hyp_codes, "hyp_codes")
    if ref.shape != hyp.shape:
        raise ValueError(f"ref_codes and hyp_codes differ in shape: {list(ref.shape)} vs {list(hyp.shape)}")
    if not observations:
        raise ValueError("observations must name at least one observation")
    unknown = [o for o in observations if o not in OBSERVATIONS]
    if unknown:
        raise ValueError(f"unknown observation(s) {unknown}; choose from {list(OBSERVATIONS)}")
    cols = observation_indices(observations)
    y_true = to_binary(ref, uncertain_as_positive=as_positive)[:, cols].astype(bool)
    y_pred = to_binary(hyp, uncertain_as_positive=as_positive)[:, cols].astype(bool)

    tp = (y_true & y_pred).sum(axis=0)
    fp = (~y_true & y_pred).sum(axis=0)
    fn = (y_true & ~y_pred).sum(axis=0)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()

    per_observation = {
        name: {"P": float(precision[j]), "R": float(recall[j]), "F1": float(f1[j]),
               "TP": int(tp[j]), "FP": int(fp[j]), "FN": int(fn[j]), "support": int(tp[j] + fn[j])}
        for j, name in enumerate(observations)
    }
    return {
        "P_micro": float(_safe_div(tp_all, tp_all + fp_all)),
        "R_micro": float(_safe_div(tp_all, tp_all + fn_all)),
        "F1_micro": float(_safe_div(2 * tp_all, 2 * tp_all + fp_all + fn_all)),
        "P_macro": float(precision.mean()),
        "R_macro": float(recall.mean()),
        "F1_macro": float(f1.mean()),
        "uncertain": uncertain,
        "observations": list(observations),
        "per_observation": per_observation,
    }


def ce_scores(ref_codes: Any, hyp_codes: Any, *, uncertain: str = "positive") -> dict[str, float | str]:
    """The flat CE keys of :func:`ifnet.metrics.compute_scores`: 14-observation, 5-observation, mapping."""
    out: dict[str, float | str] = {}
    for names, suffix in ((OBSERVATIONS, ""), (FIVE_OBSERVATIONS, FIVE_SUFFIX)):
        ce = clinical_efficacy(ref_codes, hyp_codes, uncertain=uncertain, observations=names)
        for key in CE_KEYS:
            out[key + suffix] = ce[key[len("CE_"):]]
    out[CE_UNCERTAIN_KEY] = uncertain
    return out
