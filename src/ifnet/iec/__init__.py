"""Image enhancement component (IEC): CLAHE, its adaptive variant, and the folder enhancer.

``build_enhancer(name, clip_limit, tile_grid)`` gives the on-the-fly transform the data pipeline
uses; ``ifnet enhance`` (:mod:`ifnet.iec.enhance`) applies the same transform to a folder.
"""

from ifnet.iec.clahe import (
    CLAHE,
    ENHANCERS,
    AdaptiveCLAHE,
    EnhancementConfigError,
    NoEnhancement,
    build_enhancer,
)
from ifnet.iec.quality import LowQualityCriterion, QualityReport

__all__ = [
    "CLAHE",
    "AdaptiveCLAHE",
    "NoEnhancement",
    "ENHANCERS",
    "EnhancementConfigError",
    "build_enhancer",
    "LowQualityCriterion",
    "QualityReport",
]
