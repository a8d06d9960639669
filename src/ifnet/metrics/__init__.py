"""Report-generation metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and clinical efficacy.

Typical use (a trainer scoring its validation split each epoch)::

    from ifnet.metrics import compute_scores, reference_labels

    ref_codes = reference_labels(refs)                 # once: labels the references
    scores = compute_scores(refs, hyps, ref_labels=ref_codes)
    scores["BLEU_4"], scores["CE_F1_micro"], scores["CE_uncertain"]

See docs/METRICS.md for exactly what is computed and how it compares with published numbers.
"""

from ifnet.metrics.clinical import (CE_KEYS, CE_KEYS_5, CE_UNCERTAIN_KEY, UNCERTAIN_MAPPINGS, ce_scores,
                                    clinical_efficacy)
from ifnet.metrics.meteor import MeteorUnavailable, close_meteor, get_meteor
from ifnet.metrics.nlg import NLG_KEYS, NLG_METRICS, nlg_scores
from ifnet.metrics.scoring import (ALL_METRICS, CLEANER_NAMES, SCORE_KEYS, ScoreReport, ScoringInputError,
                                   compute_scores, describe_id_mismatch, get_text_cleaner, label_texts,
                                   reference_labels, score_reports)

__all__ = [
    "ALL_METRICS", "CE_KEYS", "CE_KEYS_5", "CE_UNCERTAIN_KEY", "CLEANER_NAMES", "MeteorUnavailable",
    "NLG_KEYS", "NLG_METRICS", "SCORE_KEYS", "ScoreReport", "ScoringInputError", "UNCERTAIN_MAPPINGS",
    "ce_scores", "clinical_efficacy", "close_meteor", "compute_scores", "describe_id_mismatch",
    "get_meteor", "get_text_cleaner", "label_texts", "nlg_scores", "reference_labels", "score_reports",
]
