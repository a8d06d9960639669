"""Report labeler: free-text chest X-ray report -> the 14 CheXpert observations.

The default is an offline rule labeler (phrases + negation/uncertainty scope, no model and no
download); :mod:`ifnet.labeler.chexbert` wraps a user's local CheXbert checkpoint instead.

    >>> from ifnet.labeler import label_reports
    >>> label_reports(["Mild cardiomegaly. No pleural effusion."])[0][[1, 9, 13]].tolist()
    [1, 0, -2]

Codes are those of :mod:`ifnet.labels` (1 positive, 0 negative, -1 uncertain, -2 not mentioned),
columns in ``OBSERVATIONS`` order. See docs/LABELER.md for rules and measured agreement.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ifnet.labeler.phrases import PHRASES, ObservationPhrases
from ifnet.labeler.rules import Explanation, Labeler, Mention, ObservationExplanation

__all__ = ["Labeler", "label_reports", "Explanation", "ObservationExplanation", "Mention",
           "ObservationPhrases", "PHRASES"]

# Built once at import: a Labeler is immutable, so sharing it across threads is safe.
_DEFAULT_LABELER = Labeler()


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """CheXpert codes ``int8[N, 14]`` for N reports with the default rule labeler."""
    return _DEFAULT_LABELER.label_batch(texts)
