"""Clinical efficacy under two truths, on the validation split (``benchmarks/val_truths.py``).

The benchmark's CE compares the labels of a generated report with the labels of the reference *findings*
text (the field's definition). The synthetic images were drawn from other labels: the CheXbert labels of
each study's *impression*, given for train and val and withheld for test. The two disagree a lot
(docs/LABELER.md), so a system can read its image well and still score low against the findings text. This
module scores the same predictions against both truths where both exist, validation, so the two frames can
be compared (the issue's scale numbers, "probe about 0.32", "retrieval with the true labels 0.87", are in
the drawn-label frame). Nothing here chooses anything: it is a diagnostic.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from ifnet.baselines import cross_fitted_thresholds, label_scores

from .floors import PROBE_L2, constant_floor, fit_probe, retrieval_floor

TRUTHS = ("findings text", "drawn labels")


def findings_labels(texts: Mapping[str, str], cleaner: str = "iu_xray") -> np.ndarray:
    """CE's labels of ``{id: report}``: the project's labeler on the cleaned text, 0/1 ``[N, 14]`` in the
    dict's order (the ``label_fn`` of :func:`two_truth_view`)."""
    from ifnet.labels import to_binary
    from ifnet.metrics.scoring import reference_labels

    return to_binary(reference_labels(dict(texts), cleaner=cleaner))


def ce_pair(truth: np.ndarray, pred: np.ndarray) -> dict:
    """CE macro-F1 over the 14 labels and micro-F1 over the 13 findings of 0/1 ``pred`` against ``truth``."""
    s = label_scores(truth, pred)
    return {"F1_macro": s["F1_macro"], "F1_micro_13": s["F1_micro_13"]}


def score_frames(truths: Mapping[str, np.ndarray], systems: Mapping[str, np.ndarray]) -> dict:
    """``{system: {truth: ce_pair}}`` for 0/1 label predictions ``[N, 14]`` of each system."""
    return {name: {t: ce_pair(y, pred) for t, y in truths.items()} for name, pred in systems.items()}


def label_retrieval(train_labels: np.ndarray, val_labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each validation study, the index of a train study with the nearest label vector (Hamming
    distance, ties broken at random with ``seed``): "retrieval with the true labels"."""
    rng = np.random.default_rng(seed)
    out = []
    for row in np.asarray(val_labels):
        d = np.abs(np.asarray(train_labels) - row).sum(1)
        out.append(int(rng.choice(np.flatnonzero(d == d.min()))))
    return np.array(out, dtype=np.int64)


def cross_fitted_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       seed: int = 0, l2s: Sequence[float] = PROBE_L2) -> dict:
    """The benchmark's label probe (L2 by validation mean AUC), with thresholds cross-fitted on two halves of
    validation (each half is thresholded by the other's choice), so its validation F1 is not scored on the
    studies its thresholds were fitted to. Returns predictions, probabilities and the scores against ``y_val``.
    """
    _, pv, l2, tried = fit_probe(x_train, y_train, x_val, y_val, l2s)
    auc = tried[str(l2)]
    half, chosen = cross_fitted_thresholds(y_val, pv, y_train.mean(0), seed=seed)
    pred = (pv >= np.stack(chosen)[half]).astype(np.int64)  # each study cut by the other half's choice
    s = label_scores(y_val, pred, pv)
    return {"l2": l2, "pred": pred, "probs": pv, "mean_auc": auc,
            "F1_macro": s["F1_macro"], "F1_micro_13": s["F1_micro_13"]}


def goal_bars(floors: Mapping[str, float], probe_f1: float) -> dict:
    """The issue's two CE bars in one frame: 3x the best floor and 0.9x the probe's macro-F1."""
    best = max(floors, key=lambda k: floors[k])
    return {"best_floor": best, "3x_best_floor": 3 * floors[best], "0.9x_probe": 0.9 * probe_f1}


def two_truth_view(*, train_reports: Sequence[str], y_train: np.ndarray, drawn_train: np.ndarray,
                   y_val: np.ndarray, drawn_val: np.ndarray, x_train: np.ndarray, x_val: np.ndarray,
                   val_ids: Sequence[str], generated: Mapping[str, Mapping[str, str]],
                   label_fn: Callable[[dict], np.ndarray], seed: int = 0) -> dict:
    """Every system's validation CE against the findings text (``y_val``, the labeler on the references) and
    against the drawn labels (``drawn_val``), with the floors, retrieval with the true labels and the label
    probe on features ``x_*`` rebuilt here on validation, and each report generator's ``generated``
    validation reports (``{name: {id: report}}``; names starting ``floor:`` count as floors for the bars).
    ``label_fn({id: text}) -> [N, 14]`` 0/1 labels in the dict's order."""
    ids = list(val_ids)
    truths = dict(zip(TRUTHS, (np.asarray(y_val), np.asarray(drawn_val))))
    systems = {"floor: constant report": label_fn(constant_floor(train_reports, ids)[0]),
               "floor: nearest-neighbour retrieval": label_fn(retrieval_floor(x_train, train_reports, x_val, ids))}
    for name, hyps in generated.items():
        systems[name] = label_fn({i: hyps[i] for i in ids})
    pick = label_retrieval(drawn_train, drawn_val, seed)
    systems["retrieval with the true labels (its text)"] = np.asarray(y_train)[pick]
    frames = score_frames(truths, systems)
    frames["retrieval with the true labels (its drawn labels)"] = {
        "drawn labels": ce_pair(truths["drawn labels"], np.asarray(drawn_train)[pick])}
    probes = {t: cross_fitted_probe(x_train, np.asarray(ytr), x_val, truths[t], seed)
              for t, ytr in zip(TRUTHS, (y_train, drawn_train))}
    floors = [n for n in frames if n.startswith("floor:")]
    bars = {t: goal_bars({f: frames[f][t]["F1_macro"] for f in floors}, probes[t]["F1_macro"]) for t in TRUTHS}
    return {"studies": len(ids), "systems": frames, "bars": bars,
            "probes": {t: {k: v for k, v in p.items() if k not in ("pred", "probs")} for t, p in probes.items()}}


def view_lines(view: dict) -> list[str]:
    """The view as a markdown table (macro-F1 over 14 / micro-F1 over the 13 findings) and the two bars."""
    lines = ["| system (validation) | CE vs findings text | CE vs drawn labels |", "| --- | ---: | ---: |"]
    for name, row in view["systems"].items():
        cells = [f"{row[t]['F1_macro']:.3f} / {row[t]['F1_micro_13']:.3f}" if t in row else "" for t in TRUTHS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pr = view["probes"]
    lines.append("| label probe trained on that truth's labels (thresholds cross-fitted on validation halves) | "
                 + " | ".join(f"{pr[t]['F1_macro']:.3f} / {pr[t]['F1_micro_13']:.3f} (AUC {pr[t]['mean_auc']:.3f})"
                              for t in TRUTHS) + " |")
    lines.append("")
    lines += [f"* against the {t}: 3x the best floor ({b['best_floor']}) = {b['3x_best_floor']:.3f}; "
              f"0.9x the probe = {b['0.9x_probe']:.3f}" for t, b in view["bars"].items()]
    return lines
