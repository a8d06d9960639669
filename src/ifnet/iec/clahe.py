"""CLAHE image enhancement (IEC) as small callable transforms.

IFNet's image enhancement component is OpenCV's contrast-limited adaptive histogram equalisation
on the grayscale radiograph, with clip limit 1.7 on an 8 x 8 tile grid (the paper's settings).
The same objects serve both uses, so they give identical pixels:

* ``ifnet enhance`` (offline, a folder of images -> a new folder, :mod:`ifnet.iec.enhance`);
* the data pipeline (on the fly, chosen by name through :func:`build_enhancer`).

Input is what :func:`ifnet.data.images.read_xray` returns: a 2-D ``uint8`` or ``uint16`` array.
A ``uint16`` image is equalised on 256 grey levels: its top 8 bits (``x >> 8``) are CLAHE'd in 8 bits and the
result scaled back by 257. The clip limit is defined on a 256-bin histogram, and OpenCV's 16-bit CLAHE, with 65,536
bins, clips every bin at one count whatever the limit, which is plain histogram equalisation. So the same X-ray
gives the same enhanced pixels whether it arrives as an 8-bit PNG, a 16-bit PNG (x 257) or a DICOM. Like the rest
of the pipeline (the model's input is ``x / 65535``, docs/IEC.md "Limits"), this takes 16-bit values as spanning the
16-bit range: 12-bit data stored unscaled in a 16-bit PNG (maximum 4095) is a dark image with 16 grey levels here;
scale such files to 16 bits first (DICOM is scaled by ``read_xray``).
Colour images are converted to gray by the caller (``read_xray`` already does), never here: a
transform that silently picked a channel would hide a pipeline bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import numpy as np

from ifnet.errors import IFNetError
from ifnet.iec.quality import LowQualityCriterion, QualityReport

#: dtypes CLAHE accepts: the two OpenCV's CLAHE implements (CV_8UC1, CV_16UC1).
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))

Enhancer = Callable[[np.ndarray], np.ndarray]

#: Largest tile grid accepted: 64 x 64 tiles is already 4-pixel tiles on a 256-pixel image, and OpenCV
#: allocates a lookup table per tile (a grid of 100,000 asks for hundreds of gigabytes).
MAX_TILE_GRID = 64


class EnhancementConfigError(IFNetError, ValueError):
    """A bad enhancement setting (clip limit, grid, mode name).

    It is an IFNetError so the CLI and config loader print one line, and a ValueError so library
    callers can catch it the usual way.
    """


def check_image(img: object, who: str = "CLAHE") -> np.ndarray:
    """Return ``img`` if it is a non-empty 2-D uint8/uint16 array, else raise a clear ValueError."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"{who} expects a numpy array, got {type(img).__name__}")
    if img.ndim != 2:
        hint = (": convert colour images to grayscale first (ifnet.data.images.read_xray does)"
                if img.ndim == 3 else "")
        raise ValueError(f"{who} expects a 2-D grayscale array [H, W], got shape {img.shape}{hint}")
    if img.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{who} expects uint8 or uint16 pixels, got {img.dtype} "
                         "(scale floats to an integer range first)")
    if img.size == 0:
        raise ValueError(f"{who} got an empty image of shape {img.shape}")
    return img


def _check_params(clip_limit: object, tile_grid: object) -> None:
    # bool is an int subclass; `tile_grid=True` is a typo, not a 1 x 1 grid.
    if isinstance(clip_limit, bool) or not isinstance(clip_limit, (int, float)) \
            or not math.isfinite(clip_limit) or clip_limit <= 0:
        raise EnhancementConfigError(f"clip_limit must be a positive number, got {clip_limit!r}")
    if isinstance(tile_grid, bool) or not isinstance(tile_grid, (int, np.integer)) or tile_grid < 1:
        raise EnhancementConfigError(f"tile_grid must be a positive integer, got {tile_grid!r}")
    if tile_grid > MAX_TILE_GRID:
        raise EnhancementConfigError(f"tile_grid must be at most {MAX_TILE_GRID} (tiles per side), got {tile_grid!r}")


@dataclass(frozen=True)
class CLAHE:
    """OpenCV CLAHE on a 2-D grayscale image; same shape and dtype out.

    ``img`` [H, W] uint8 or uint16 -> [H, W] of the same dtype. Frozen (hashable, picklable) so it
    can be shipped to DataLoader and process-pool workers.
    """

    #: Histogram clip limit, in multiples of the mean bin count (OpenCV's ``clipLimit``). 1.7 is
    #: the paper's value: enough to lift low-contrast lungs without amplifying noise much.
    clip_limit: float = 1.7
    #: The image is split into ``tile_grid x tile_grid`` tiles, each equalised on its own and
    #: bilinearly blended. 8 is OpenCV's and the paper's default.
    tile_grid: int = 8

    def __post_init__(self) -> None:
        _check_params(self.clip_limit, self.tile_grid)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        import cv2

        check_image(img, "CLAHE")
        # A new CLAHE object per call costs microseconds and keeps the transform free of shared
        # mutable OpenCV state (safe across threads and after fork).
        clahe = cv2.createCLAHE(clipLimit=float(self.clip_limit),
                                tileGridSize=(int(self.tile_grid), int(self.tile_grid)))
        if img.dtype == np.uint16:  # 256 grey levels, as the clip limit means (module docstring)
            top = np.ascontiguousarray(img >> 8, dtype=np.uint8)  # x 257 images: exactly their 8-bit values
            return clahe.apply(top).astype(np.uint16) * np.uint16(257)
        return clahe.apply(np.ascontiguousarray(img))


@dataclass(frozen=True)
class AdaptiveCLAHE:
    """CLAHE only for images the quality criterion judges low quality; identity otherwise.

    The probe found CLAHE helps low-quality radiographs and slightly hurts normal ones, so this
    variant applies it where it helps. An image judged normal is returned unchanged (the same
    array object, not a copy). The criterion is in :mod:`ifnet.iec.quality` and docs/IEC.md.
    """

    clip_limit: float = 1.7
    tile_grid: int = 8
    #: The rule deciding "low quality"; its thresholds are documented in ifnet.iec.quality.
    criterion: LowQualityCriterion = field(default_factory=LowQualityCriterion)

    def __post_init__(self) -> None:
        _check_params(self.clip_limit, self.tile_grid)

    def judge(self, img: np.ndarray) -> QualityReport:
        """The criterion's verdict on ``img`` (with the statistics it used and why)."""
        return self.criterion.assess(check_image(img, "AdaptiveCLAHE"))

    def apply_and_judge(self, img: np.ndarray) -> Tuple[np.ndarray, QualityReport]:
        """(output, verdict): the transform and the judgement it was based on, measured once."""
        verdict = self.judge(img)
        if verdict.low_quality:
            return CLAHE(self.clip_limit, self.tile_grid)(img), verdict
        return img, verdict

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.apply_and_judge(img)[0]


@dataclass(frozen=True)
class NoEnhancement:
    """Identity (the ``none`` enhancer): checks the input like the others, returns it unchanged."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return check_image(img, "NoEnhancement")


def _build_none(clip_limit: float, tile_grid: int) -> Enhancer:
    _check_params(clip_limit, tile_grid)  # a bad value in the config is still a bad value
    return NoEnhancement()


#: name -> factory(clip_limit, tile_grid). The data config's ``enhance:`` switch and
#: ``ifnet enhance --mode`` both choose from these names.
ENHANCERS: Dict[str, Callable[[float, int], Enhancer]] = {
    "none": _build_none,
    "clahe": CLAHE,
    "adaptive": AdaptiveCLAHE,
}


def build_enhancer(name: str, clip_limit: float = 1.7, tile_grid: int = 8) -> Enhancer:
    """The enhancement transform called ``name`` (``none``, ``clahe`` or ``adaptive``).

    Raises EnhancementConfigError (a ValueError) for an unknown name or a bad parameter.
    """
    try:
        factory = ENHANCERS[name]
    except (KeyError, TypeError):
        raise EnhancementConfigError(
            f"unknown enhancement {name!r}; choose one of {', '.join(ENHANCERS)}") from None
    return factory(clip_limit, tile_grid)
