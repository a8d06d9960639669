"""BLEU-1..4, METEOR, ROUGE-L and CIDEr through pycocoevalcap 1.2, called the way R2Gen does.

R2Gen, R2GenCMN and XProNet (``modules/metrics.py``) build ``{i: [text]}`` dicts of *already
cleaned* reports and call ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` directly, with no
PTB-tokenizer step (unlike the COCO caption evaluation). This module does exactly that and nothing
more, so corpus numbers are bit-identical to those direct calls on the same texts.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from ifnet.metrics.meteor import get_meteor

#: Metric groups a caller can ask for, in R2Gen's order.
NLG_METRICS: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
BLEU_KEYS: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")
#: Result keys, R2Gen's names.
NLG_KEYS: tuple[str, ...] = BLEU_KEYS + ("METEOR", "ROUGE_L", "CIDEr")

Gts = Mapping[int, Sequence[str]]
Res = Mapping[int, Sequence[str]]


def nlg_scores(gts: Gts, res: Res, metrics: Sequence[str] = NLG_METRICS,
               ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Corpus scores and per-study scores of the requested NLG metrics.

    Args:
        gts: {key: [reference, ...]} (one or more references per study), text already cleaned.
        res: {key: [hypothesis]} with the same keys in the same order.
        metrics: a subset of :data:`NLG_METRICS`.

    Returns:
        ``(corpus, per_study)``: ``corpus[key]`` is pycocoevalcap's corpus score (BLEU and METEOR
        are computed from pooled statistics, so they are *not* the mean of the per-study values;
        ROUGE-L and CIDEr are); ``per_study[key][i]`` is pycocoevalcap's score for the i-th study.
    """
    unknown = [m for m in metrics if m not in NLG_METRICS]
    if unknown:
        raise ValueError(f"unknown NLG metric(s) {unknown}; choose from {list(NLG_METRICS)}")
    # pycocoevalcap's scorers want real lists (they assert type(x) is list).
    gts_l = {k: list(v) for k, v in gts.items()}
    res_l = {k: list(v) for k, v in res.items()}
    corpus: dict[str, float] = {}
    per_study: dict[str, list[float]] = {}
    for metric in NLG_METRICS:  # fixed order, whatever order the caller listed them in
        if metric not in metrics:
            continue
        if metric == "BLEU":
            # verbose=0: pycocoevalcap otherwise prints its n-gram counts to stdout.
            score, scores = Bleu(4).compute_score(gts_l, res_l, verbose=0)
            for n, key in enumerate(BLEU_KEYS):
                corpus[key] = float(score[n])
                per_study[key] = [float(s) for s in scores[n]]
            continue
        if metric == "METEOR":
            score, scores = get_meteor().compute_score(gts_l, res_l)
        elif metric == "ROUGE_L":
            score, scores = Rouge().compute_score(gts_l, res_l)
        else:
            score, scores = Cider().compute_score(gts_l, res_l)
        corpus[metric] = float(score)
        per_study[metric] = [float(s) for s in scores]
    return corpus, per_study
