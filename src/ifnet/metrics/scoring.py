"""One entry point for every score: text preparation, NLG metrics, labels and clinical efficacy.

Text preparation, applied identically to references and hypotheses:

1. R2Gen's cleaning (``cleaner="iu_xray"`` or ``"mimic_cxr"``; ``None`` / ``"none"`` skips it).
2. Whitespace runs folded into single spaces, ends stripped. R2Gen scores ``tokenizer.decode``
   output, i.e. its cleaned tokens joined by one space, so this is what its scorers saw too.

An empty (or whitespace-only) hypothesis stays empty rather than being cleaned into ``"."``; it
scores 0 on every per-study metric and still counts in the corpus statistics (so it lowers BLEU's
brevity penalty and METEOR's recall). An empty reference is an error.

On text that is already clean the two steps change nothing, so the scores equal direct
pycocoevalcap calls on the same strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ifnet.data.tokenizer import CLEANERS
from ifnet.errors import IFNetError
from ifnet.labels import OBSERVATIONS
from ifnet.metrics.clinical import CE_KEYS, CE_KEYS_5, ce_scores, check_codes, check_uncertain
from ifnet.metrics.meteor import find_java
from ifnet.metrics.nlg import NLG_KEYS, NLG_METRICS, nlg_scores

#: Everything ``compute_scores`` can compute, and its default.
ALL_METRICS: tuple[str, ...] = NLG_METRICS + ("CE",)
#: Every score key, in table order (CE_uncertain, a string, is not included).
SCORE_KEYS: tuple[str, ...] = NLG_KEYS + CE_KEYS + CE_KEYS_5
CLEANER_NAMES: tuple[str, ...] = tuple(CLEANERS) + ("none",)

Reference = Union[str, Sequence[str]]
Hypothesis = Union[str, Sequence[str]]
#: Precomputed reference labels: [N, 14] codes in ``refs`` order, or {study_id: 14 codes}.
RefLabels = Union[np.ndarray, Sequence[Sequence[int]], Mapping[Any, Sequence[int]]]

#: How many ids an error message lists before "... and N more".
_MAX_IDS_SHOWN = 8


class ScoringInputError(IFNetError, ValueError):
    """Inputs that cannot be scored (mismatched ids, empty references, bad labels). One line."""


class EmptyReferenceError(ScoringInputError):
    """A reference with no words left after cleaning; ``study`` names it, so a caller that knows the file
    can name that too."""

    def __init__(self, study: str) -> None:
        self.study = study
        super().__init__(f"study {study}: empty reference (no words left after cleaning)")


@dataclass
class ScoreReport:
    """Corpus scores plus one row per study (what ``ifnet score --per-study`` writes)."""

    #: :func:`compute_scores`'s dict.
    scores: dict[str, Union[float, str]]
    #: Per study: id, references, hypothesis (prepared text), per-study metric values,
    #: and ``ref_labels`` / ``hyp_labels`` ({observation: code}) when CE was computed.
    per_study: list[dict[str, Any]] = field(default_factory=list)


def get_text_cleaner(cleaner: Optional[str]) -> Callable[[str], str]:
    """The full preparation function (R2Gen cleaning, then whitespace folding) for ``cleaner``."""
    if cleaner is None or cleaner == "none":
        clean: Callable[[str], str] = lambda text: text  # noqa: E731
    elif cleaner in CLEANERS:
        clean = CLEANERS[cleaner]
    else:
        raise ScoringInputError(f"unknown cleaner {cleaner!r}; choose from {list(CLEANER_NAMES)}")

    def prepare(text: str) -> str:
        if not text.strip():
            return ""  # R2Gen's cleaning would turn "" into "." and let it match every "."
        return " ".join(clean(text).split())

    return prepare


def describe_id_mismatch(ref_ids: Sequence[Any], hyp_ids: Sequence[Any], *,
                         refs_name: str = "refs", hyps_name: str = "hyps") -> Optional[str]:
    """A one-line description of how two id collections differ, or None if they are the same set."""
    ref_set, hyp_set = set(ref_ids), set(hyp_ids)
    if ref_set == hyp_set:
        return None
    parts = []
    for name, ids, other in ((refs_name, ref_ids, hyp_set), (hyps_name, hyp_ids, ref_set)):
        only = [str(i) for i in ids if i not in other]
        if only:
            shown = ", ".join(only[:_MAX_IDS_SHOWN])
            more = f", ... and {len(only) - _MAX_IDS_SHOWN} more" if len(only) > _MAX_IDS_SHOWN else ""
            parts.append(f"{len(only)} only in {name} ({shown}{more})")
    return f"{refs_name} and {hyps_name} have different study ids: " + "; ".join(parts)


def _as_list(value: Any, what: str, study: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ScoringInputError(f"{what} of study {study}: expected a string or a non-empty list of "
                            f"strings, got {type(value).__name__}")


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ScoringInputError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    if not metrics:
        raise ScoringInputError(f"no metrics asked for; choose from {list(ALL_METRICS)}")
    return [m for m in ALL_METRICS if m in metrics]


def label_texts(texts: Sequence[str]) -> np.ndarray:
    """CheXpert codes [N, 14] for ``texts`` from :mod:`ifnet.labeler` (imported on first use)."""
    try:
        from ifnet.labeler import label_reports
    except ImportError as e:
        raise IFNetError(f"clinical efficacy needs the report labeler (ifnet.labeler), which could not "
                         f"be imported ({e}); leave CE out of the metrics") from None
    return check_codes(label_reports(list(texts)), "labels from ifnet.labeler")


def reference_labels(refs: Mapping[Any, Reference], *, cleaner: Optional[str] = "iu_xray") -> np.ndarray:
    """Label the references once, for ``compute_scores(..., ref_labels=...)`` on every epoch.

    Labels the prepared text, like :func:`compute_scores` does. Rows follow ``refs``' order.
    """
    prepare = get_text_cleaner(cleaner)
    texts = []
    for study, value in refs.items():
        texts.append(prepare(_single_reference(_as_list(value, "reference", study), study)))
    return label_texts(texts)


def _single_reference(ref_list: list[str], study: Any) -> str:
    if len(ref_list) != 1:
        raise ScoringInputError(f"study {study} has {len(ref_list)} references; clinical efficacy "
                                f"compares one reference label set with one hypothesis, so give one "
                                f"reference per study or leave CE out")
    return ref_list[0]


def _ref_label_array(ref_labels: RefLabels, ids: list[Any]) -> np.ndarray:
    if isinstance(ref_labels, Mapping):
        missing = [str(i) for i in ids if i not in ref_labels]
        if missing:
            raise ScoringInputError(f"ref_labels has no labels for {len(missing)} studies "
                                    f"({', '.join(missing[:_MAX_IDS_SHOWN])})")
        rows = [ref_labels[i] for i in ids]
        arr = np.asarray(rows) if rows else np.zeros((0, len(OBSERVATIONS)), dtype=np.int64)
    else:
        arr = np.asarray(ref_labels)
    try:
        arr = check_codes(arr, "ref_labels")
    except ValueError as e:
        raise ScoringInputError(str(e)) from None
    if arr.shape[0] != len(ids):
        raise ScoringInputError(f"ref_labels has {arr.shape[0]} rows but there are {len(ids)} studies")
    return arr


def score_reports(refs: Mapping[Any, Reference], hyps: Mapping[Any, Hypothesis], *,
                  cleaner: Optional[str] = "iu_xray", metrics: Sequence[str] = ALL_METRICS,
                  uncertain: str = "positive", ref_labels: Optional[RefLabels] = None) -> ScoreReport:
    """:func:`compute_scores` plus per-study rows. Same arguments."""
    wanted = _check_metrics(metrics)
    try:
        check_uncertain(uncertain)
    except ValueError as e:
        raise ScoringInputError(str(e)) from None
    prepare = get_text_cleaner(cleaner)
    mismatch = describe_id_mismatch(list(refs), list(hyps))
    if mismatch:
        raise ScoringInputError(mismatch)
    ids = list(refs)  # the references' order decides the order of studies everywhere
    if not ids:
        raise ScoringInputError("nothing to score: refs and hyps are empty")
    if "METEOR" in wanted:
        find_java()  # fail before the (possibly long) other metrics, not after

    ref_texts: list[list[str]] = []
    hyp_texts: list[str] = []
    for study in ids:
        prepared_refs = [prepare(r) for r in _as_list(refs[study], "reference", study)]
        if not all(prepared_refs):
            raise EmptyReferenceError(study)
        hyp_list = _as_list(hyps[study], "hypothesis", study)
        if len(hyp_list) != 1:
            raise ScoringInputError(f"study {study}: expected one hypothesis, got {len(hyp_list)}")
        ref_texts.append(prepared_refs)
        hyp_texts.append(prepare(hyp_list[0]))

    scores: dict[str, Union[float, str]] = {}
    per_metric: dict[str, list[float]] = {}
    nlg_wanted = [m for m in wanted if m in NLG_METRICS]
    if nlg_wanted:
        # Integer keys in study order, as R2Gen builds them ({i: [text]}).
        gts = {i: refs_i for i, refs_i in enumerate(ref_texts)}
        res = {i: [hyp] for i, hyp in enumerate(hyp_texts)}
        corpus, per_metric = nlg_scores(gts, res, nlg_wanted)
        scores.update(corpus)

    ref_codes = hyp_codes = None
    if "CE" in wanted:
        if ref_labels is not None:
            ref_codes = _ref_label_array(ref_labels, ids)
        else:
            ref_codes = label_texts([_single_reference(r, s) for r, s in zip(ref_texts, ids)])
        hyp_codes = label_texts(hyp_texts)
        scores.update(ce_scores(ref_codes, hyp_codes, uncertain=uncertain))

    per_study = []
    for i, study in enumerate(ids):
        row: dict[str, Any] = {"id": str(study), "references": ref_texts[i], "hypothesis": hyp_texts[i]}
        for key, values in per_metric.items():
            row[key] = values[i]
        if ref_codes is not None and hyp_codes is not None:
            row["ref_labels"] = dict(zip(OBSERVATIONS, (int(c) for c in ref_codes[i])))
            row["hyp_labels"] = dict(zip(OBSERVATIONS, (int(c) for c in hyp_codes[i])))
        per_study.append(row)
    return ScoreReport(scores=scores, per_study=per_study)


def compute_scores(refs: Mapping[Any, Reference], hyps: Mapping[Any, Hypothesis], *,
                   cleaner: Optional[str] = "iu_xray", metrics: Sequence[str] = ALL_METRICS,
                   uncertain: str = "positive",
                   ref_labels: Optional[RefLabels] = None) -> dict[str, Union[float, str]]:
    """Score generated reports against references: NLG metrics and clinical efficacy.

    Args:
        refs: {study_id: reference text or [reference texts]}; its order is the study order.
        hyps: {study_id: generated text (or a one-element list)}, the same ids as ``refs``.
        cleaner: R2Gen cleaning applied to both sides: "iu_xray", "mimic_cxr", or None/"none".
        metrics: any of "BLEU", "METEOR", "ROUGE_L", "CIDEr", "CE".
        uncertain: "positive" or "negative": how uncertain labels count in CE.
        ref_labels: precomputed reference codes (see :func:`reference_labels`), [N, 14] in ``refs``
            order or {study_id: 14 codes}, so a trainer labels its references once, not each epoch.

    Returns:
        Floats under BLEU_1..BLEU_4, METEOR, ROUGE_L, CIDEr (for the metrics asked for) and, with CE,
        CE_{P,R,F1}_{micro,macro} over the 14 observations, the same keys with suffix ``_5`` over
        the five common ones, and ``CE_uncertain`` (a string: the mapping used).

    Raises:
        ScoringInputError: different id sets, empty reference, unknown metric/cleaner/mapping.
        MeteorUnavailable: METEOR asked for and Java missing or failing.
    """
    return score_reports(refs, hyps, cleaner=cleaner, metrics=metrics, uncertain=uncertain,
                         ref_labels=ref_labels).scores


__all__ = ["ALL_METRICS", "CLEANER_NAMES", "SCORE_KEYS", "ScoreReport",
           "ScoringInputError", "compute_scores", "describe_id_mismatch", "get_text_cleaner",
           "label_texts", "reference_labels", "score_reports"]
