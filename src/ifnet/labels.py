"""The 14 CheXpert observations and their label codes, shared by the labeler, model and metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: CheXpert / CheXbert output order. Index i of every label vector in the toolkit is OBSERVATIONS[i].
OBSERVATIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
NUM_OBSERVATIONS = len(OBSERVATIONS)
NO_FINDING_INDEX = OBSERVATIONS.index("No Finding")
#: The 13 findings (everything but No Finding).
FINDINGS: tuple[str, ...] = OBSERVATIONS[:NO_FINDING_INDEX]
#: The five common observations most CE tables report (CheXpert competition set).
FIVE_OBSERVATIONS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
)

# CheXpert label codes. BLANK means "not mentioned" (an empty cell in CheXpert's CSV).
POSITIVE = 1
NEGATIVE = 0
UNCERTAIN = -1
BLANK = -2
CODE_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain", BLANK: "not mentioned"}


def to_binary(codes: np.ndarray | Sequence[Sequence[int]], uncertain_as_positive: bool = True) -> np.ndarray:
    """Map CheXpert codes [N, 14] to 0/1: positive -> 1, negative/blank -> 0, uncertain -> option."""
    arr = np.asarray(codes)
    out = (arr == POSITIVE)
    if uncertain_as_positive:
        out |= (arr == UNCERTAIN)
    return out.astype(np.int64)


def observation_indices(names: Sequence[str]) -> list[int]:
    return [OBSERVATIONS.index(n) for n in names]
