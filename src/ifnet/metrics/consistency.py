"""Report-condition consistency: does a generated report say the findings it was conditioned on?

IFNet writes each report from a 14-label condition: the label head's findings at their validation
thresholds, or findings a radiologist supplies (``ifnet generate --findings``). The report and the
findings shown beside it can still disagree: the decoder may leave a finding of its condition unsaid,
or assert one its condition does not hold. On the synthetic-image benchmark the most common assertion of
that kind is a guided sentence that lost its negation, "there is a focal airspace consolidation
pneumothorax or large pleural effusion" (docs/RESULTS.md). This module labels the generated text with
the project's labeler and compares it with the condition.

It needs **no reference report**, so it applies to a new study as well as to a test set, and it measures
the decoder alone: how faithfully the text says what the model decided, not whether the decision was right
(that is clinical efficacy, :mod:`ifnet.metrics.clinical`).

Definitions:

* A finding is *in the condition* when its condition value is >= 0.5 (the thresholded condition is 0/1;
  a probability condition counts where it is at least even).
* A finding is *said* when the labeler codes the text positive, or uncertain with ``uncertain="positive"``
  (the default, as CE counts it).
* Per study, over the 13 findings (No Finding is the absence of the others): ``unsupported`` = said but
  not in the condition; ``unsaid`` = in the condition but not said.
* The summary is :func:`ifnet.metrics.clinical.clinical_efficacy` with the condition in the place of the
  reference: precision is the share of said findings the condition supports, recall the share of
  condition findings the text says (No Finding included, as in CE). Unlike CE's macro average, which
  counts an observation neither side holds as F1 0, the macro averages here run over the observations
  that occur on either side (``observations_present``): agreeing that a finding is absent is not a miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ifnet.labels import FINDINGS, NEGATIVE, NUM_OBSERVATIONS, OBSERVATIONS, POSITIVE, to_binary
from ifnet.metrics.clinical import check_uncertain, clinical_efficacy

#: A condition value at or above this counts as "in the condition".
CONDITION_CUTOFF = 0.5


@dataclass(frozen=True)
class StudyConsistency:
    """One report against its condition; finding names in OBSERVATIONS order (No Finding never listed)."""

    said: tuple[str, ...]
    unsupported: tuple[str, ...]  # said, not in the condition
    unsaid: tuple[str, ...]  # in the condition, not said

    @property
    def consistent(self) -> bool:
        return not self.unsupported and not self.unsaid

    def to_json(self) -> dict[str, Any]:
        return {"said": list(self.said), "unsupported": list(self.unsupported), "unsaid": list(self.unsaid)}


def check_condition(condition: Any) -> np.ndarray:
    """``condition`` as a float array ``[N, 14]`` of finite values in [0, 1], or ValueError saying why."""
    arr = np.asarray(condition, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != NUM_OBSERVATIONS:
        raise ValueError(f"condition must have shape [N, {NUM_OBSERVATIONS}], got {list(np.shape(condition))}")
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"condition[{row}, {col}] ({OBSERVATIONS[col]}) is {float(arr[row, col])!r}; condition values "
                         f"are label probabilities or 0/1 in [0, 1]")
    return arr


def condition_codes(condition: Any) -> np.ndarray:
    """CheXpert codes ``[N, 14]`` of a condition: positive where >= :data:`CONDITION_CUTOFF`, else negative."""
    arr = check_condition(condition)
    return np.where(arr >= CONDITION_CUTOFF, POSITIVE, NEGATIVE).astype(np.int64)


def compare(condition: Any, text_codes: Any, *, uncertain: str = "positive") -> list[StudyConsistency]:
    """Per study: what the text (labeler codes ``[N, 14]``) says against its condition ``[N, 14]``."""
    as_positive = check_uncertain(uncertain)
    cond = to_binary(condition_codes(condition)).astype(bool)
    said = to_binary(np.asarray(text_codes), uncertain_as_positive=as_positive).astype(bool)
    if cond.shape != said.shape:
        raise ValueError(f"condition and text labels differ in shape: {list(cond.shape)} vs {list(said.shape)}")
    n = len(FINDINGS)
    out = []
    for c, s in zip(cond[:, :n], said[:, :n]):
        out.append(StudyConsistency(
            said=tuple(FINDINGS[j] for j in np.flatnonzero(s)),
            unsupported=tuple(FINDINGS[j] for j in np.flatnonzero(s & ~c)),
            unsaid=tuple(FINDINGS[j] for j in np.flatnonzero(c & ~s))))
    return out


def summarize(condition: Any, text_codes: Any, *, uncertain: str = "positive") -> dict[str, Any]:
    """Corpus summary: precision/recall/F1 of the text against the condition (micro and macro over the 14
    observations, per observation), and how many reports assert or omit a finding."""
    return _summary(condition, text_codes, compare(condition, text_codes, uncertain=uncertain), uncertain)


def _summary(condition: Any, text_codes: Any, studies: Sequence[StudyConsistency], uncertain: str) -> dict[str, Any]:
    """:func:`summarize` from the per-study comparison already made."""
    ce = clinical_efficacy(condition_codes(condition), text_codes, uncertain=uncertain)
    rows = ce["per_observation"]
    present = [name for name in OBSERVATIONS if rows[name]["TP"] + rows[name]["FP"] + rows[name]["FN"] > 0]
    macro = {f"{m}_macro": float(np.mean([rows[name][m] for name in present])) if present else 1.0
             for m in ("P", "R", "F1")}
    return {
        "studies": len(studies),
        "consistent_reports": sum(s.consistent for s in studies),
        "reports_with_unsupported": sum(bool(s.unsupported) for s in studies),
        "reports_with_unsaid": sum(bool(s.unsaid) for s in studies),
        **{k: ce[k] for k in ("P_micro", "R_micro", "F1_micro")}, **macro,
        "observations_present": present,
        "uncertain": uncertain,
        "per_observation": ce["per_observation"],
    }


def label_generated(reports: Sequence[str], *, cleaner: Optional[str] = "iu_xray") -> np.ndarray:
    """Labeler codes ``[N, 14]`` of generated reports, prepared with the same cleaner as CE's hypotheses."""
    from ifnet.metrics.scoring import get_text_cleaner, label_texts

    prepare = get_text_cleaner(cleaner)
    return label_texts([prepare(r) for r in reports])


def check_reports(condition: Any, reports: Sequence[str], *, cleaner: Optional[str] = "iu_xray",
                  uncertain: str = "positive") -> tuple[list[StudyConsistency], dict[str, Any]]:
    """Label ``reports`` and compare each with its row of ``condition`` -> (per study, summary)."""
    cond = check_condition(condition)
    if len(reports) != cond.shape[0]:
        raise ValueError(f"{len(reports)} reports but {cond.shape[0]} condition rows")
    codes = label_generated(reports, cleaner=cleaner)
    studies = compare(cond, codes, uncertain=uncertain)
    return studies, _summary(cond, codes, studies, uncertain)


def consistency_note(summary: dict[str, Any]) -> str:
    """One line for a report page: how many reports agree with their condition, and where they do not."""
    n = summary["studies"]
    return (f"report vs its condition (reference-free, ifnet.metrics.consistency): {summary['consistent_reports']} "
            f"of {n} reports say exactly the findings they were decoded from; {summary['reports_with_unsaid']} leave "
            f"a condition finding unsaid; {summary['reports_with_unsupported']} say a finding not in their condition; "
            f"F1 macro {summary['F1_macro']:.3f}, micro {summary['F1_micro']:.3f}")
