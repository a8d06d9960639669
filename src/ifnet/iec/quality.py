"""The adaptive IEC's criterion: is this radiograph low quality (so CLAHE should be applied)?

The rule uses two intensity percentiles, as fractions of the full scale of the image's dtype
(255 for uint8, 65535 for uint16):

* **black level** = 1st percentile. A well-exposed, well-processed radiograph uses the whole display
  range: the directly exposed regions (air beside the patient, the lungs) reach black. A black level
  above ``black_level_max`` (0.04, about 10 of 255) means the dark end is lifted: veiling glare or
  scatter (hazy), a washed-out underexposed film, or a compressed contrast window.
* **white level** = 99th percentile. Dense bone should approach white. A white level below
  ``white_level_min`` (0.70) means nothing in the image gets bright: an overexposed, burned-out film
  (or, again, a compressed window).

The image is judged low quality if either test fires. Both thresholds were chosen on synthetic
*train* images and measured on the test images; docs/IEC.md has the numbers. They are round values
inside the gap between the classes, not fitted to the last decimal.

Limitation: the statistics assume the pixel values span the dtype's range. A 12-bit image stored
unscaled in a 16-bit PNG (maximum 4095) has a white level of 0.06 and is judged low quality;
``read_xray`` scales DICOM to the full 16-bit range, so DICOM input is not affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: Bumped whenever the rule or its defaults change, so ``ifnet enhance`` redoes adaptive outputs.
CRITERION_VERSION = 1


def intensity_percentiles(img: np.ndarray, percents: Tuple[int, ...]) -> Tuple[float, ...]:
    """Percentiles of ``img`` as fractions of its dtype's full scale (uint8/uint16 only).

    Definition (numpy's ``method="inverted_cdf"``): the p-th percentile is the smallest value v such
    that at least ``p% of N`` pixels are <= v, i.e. the ``ceil(p * N / 100)``-th smallest pixel.
    Computed from a histogram (O(N), no sort) with integer ranks, so there is no rounding surprise.
    """
    if img.dtype == np.uint8:
        full_scale = 255
    elif img.dtype == np.uint16:
        full_scale = 65535
    else:
        raise ValueError(f"intensity_percentiles expects uint8 or uint16, got {img.dtype}")
    if img.size == 0:
        raise ValueError("intensity_percentiles got an empty image")
    counts = np.bincount(img.ravel(), minlength=full_scale + 1)
    cumulative = np.cumsum(counts)
    n = int(img.size)
    out = []
    for p in percents:
        if not 0 < p <= 100:
            raise ValueError(f"percent must be in (0, 100], got {p}")
        rank = max(1, -(-p * n // 100))  # ceil(p * n / 100) in integers
        out.append(int(np.searchsorted(cumulative, rank)) / full_scale)
    return tuple(out)


@dataclass(frozen=True)
class QualityReport:
    """What the criterion measured on one image and what it decided."""

    black_level: float  #: 1st percentile / full scale
    white_level: float  #: 99th percentile / full scale
    low_quality: bool
    #: Which tests fired, e.g. ("raised black level",); empty when judged normal.
    reasons: Tuple[str, ...]


@dataclass(frozen=True)
class LowQualityCriterion:
    """Judge an image low quality when its black level is lifted or its white level is low.

    See the module docstring for the reasoning; docs/IEC.md for the measured agreement.
    """

    #: Black level (1st percentile, fraction of full scale) above this -> low quality.
    black_level_max: float = 0.04
    #: White level (99th percentile, fraction of full scale) below this -> low quality.
    white_level_min: float = 0.70

    def __post_init__(self) -> None:
        for name in ("black_level_max", "white_level_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")

    def assess(self, img: np.ndarray) -> QualityReport:
        """Measure ``img`` ([H, W] uint8 or uint16) and decide."""
        if img.ndim != 2:
            raise ValueError(f"the quality criterion expects a 2-D grayscale array, got shape {img.shape}")
        black, white = intensity_percentiles(img, (1, 99))
        reasons = []
        if black > self.black_level_max:
            reasons.append("raised black level")
        if white < self.white_level_min:
            reasons.append("low white level")
        return QualityReport(black_level=black, white_level=white,
                             low_quality=bool(reasons), reasons=tuple(reasons))

    def is_low_quality(self, img: np.ndarray) -> bool:
        return self.assess(img).low_quality

    def describe(self) -> dict:
        """The rule's identity, stored with enhanced outputs so a changed rule redoes them."""
        return {"version": CRITERION_VERSION, "black_level_max": self.black_level_max,
                "white_level_min": self.white_level_min}
