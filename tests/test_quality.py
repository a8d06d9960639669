"""The adaptive IEC's low-quality criterion: percentiles, the rule, and real synthetic images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ifnet.data.images import read_xray
from ifnet.iec.quality import CRITERION_VERSION, LowQualityCriterion, intensity_percentiles


def test_percentiles_hand_computed():
    # 100 pixels 0..99: the 1st percentile is the 1st smallest (0), the 99th the 99th smallest (98).
    img = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert intensity_percentiles(img, (1, 99)) == (0.0, 98 / 255)
    # 250 pixels: ranks ceil(2.5) = 3 and ceil(247.5) = 248 -> values 2 and 247.
    img = np.arange(250, dtype=np.uint8).reshape(10, 25)
    assert intensity_percentiles(img, (1, 99)) == (2 / 255, 247 / 255)
    # uint16 is measured against 65535, not 255.
    assert intensity_percentiles(np.full((3, 3), 65535, np.uint16), (1, 99, 100)) == (1.0, 1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([np.uint8, np.uint16]), st.integers(1, 400), st.integers(0, 2**32 - 1))
def test_percentiles_match_numpy_inverted_cdf(dtype, n, seed):
    top = np.iinfo(dtype).max
    img = np.random.default_rng(seed).integers(0, top + 1, size=(1, n)).astype(dtype)
    got = intensity_percentiles(img, (1, 50, 99))
    want = np.percentile(img, [1, 50, 99], method="inverted_cdf") / top
    np.testing.assert_array_equal(got, want)


def test_percentiles_reject_bad_input():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        intensity_percentiles(np.zeros((2, 2), np.float32), (1,))
    with pytest.raises(ValueError, match="empty"):
        intensity_percentiles(np.zeros((0, 2), np.uint8), (1,))
    with pytest.raises(ValueError, match="percent"):
        intensity_percentiles(np.zeros((2, 2), np.uint8), (0,))


def ramp(lo: int, hi: int) -> np.ndarray:
    """An image whose values run evenly from lo to hi (inclusive), 100 x (hi - lo + 1)."""
    return np.tile(np.arange(lo, hi + 1, dtype=np.uint8), (100, 1))


@pytest.mark.parametrize("img,low,reasons", [
    (ramp(0, 255), False, ()),                                        # full range: normal
    (ramp(90, 160), True, ("raised black level", "low white level")),  # low contrast
    (ramp(40, 255), True, ("raised black level",)),                  # hazy / underexposed
    (ramp(0, 150), True, ("low white level",)),                      # overexposed (dark)
])
def test_rule_on_constructed_images(img, low, reasons):
    report = LowQualityCriterion().assess(img)
    assert report.low_quality is low
    assert report.reasons == reasons


def test_threshold_boundaries():
    # Black level 10/255 = 0.0392 is within the default 0.04; 11/255 = 0.0431 is above it.
    base = ramp(0, 255)
    assert not LowQualityCriterion().is_low_quality(np.maximum(base, 10))
    assert LowQualityCriterion().assess(np.maximum(base, 11)).reasons == ("raised black level",)
    # White level 179/255 = 0.702 is within 0.70; 178/255 = 0.698 is below it.
    assert not LowQualityCriterion().is_low_quality(np.minimum(base, 179))
    assert LowQualityCriterion().assess(np.minimum(base, 178)).reasons == ("low white level",)
    # Thresholds are parameters: black 0.0 and white 1.0 pass even the strictest setting.
    img = np.zeros((10, 10), np.uint8)
    img[:, 5:] = 255
    assert not LowQualityCriterion(black_level_max=0.0, white_level_min=1.0).is_low_quality(img)


def test_uint16_uses_the_16_bit_scale():
    img16 = ramp(0, 255).astype(np.uint16) * 257  # same picture in 16 bits
    assert not LowQualityCriterion().is_low_quality(img16)
    # The same numbers stored unscaled in 16 bits are a dark image (documented limitation).
    assert LowQualityCriterion().assess(ramp(0, 255).astype(np.uint16)).reasons == ("low white level",)


def test_criterion_validation_and_identity():
    with pytest.raises(ValueError, match="black_level_max"):
        LowQualityCriterion(black_level_max=1.5)
    with pytest.raises(ValueError, match="white_level_min"):
        LowQualityCriterion(white_level_min=float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        LowQualityCriterion().assess(np.zeros((4, 4, 3), np.uint8))
    assert LowQualityCriterion().describe() == {
        "version": CRITERION_VERSION, "black_level_max": 0.04, "white_level_min": 0.70}


def test_real_synthetic_images(shared_dir, iu_synth_images):
    """On the rendered test images: normal studies are judged normal, washed-out ones low quality.

    A sample (first studies of each kind in sorted order), so the test stays fast; the full
    agreement table over all 1180 images is in docs/IEC.md.
    """
    quality = json.loads((shared_dir / "data" / "iu_xray_synth" / "quality.json").read_text())["quality"]
    crit = LowQualityCriterion()
    by_kind: dict = {}
    for sid in sorted(quality):
        by_kind.setdefault(quality[sid], []).append(sid)
    for kind, n in [(None, 12), ("low_contrast", 4), ("hazy", 4), ("underexposed", 4)]:
        for sid in by_kind[kind][:n]:
            for view in ("0.png", "1.png"):
                report = crit.assess(read_xray(iu_synth_images / sid / view))
                assert report.low_quality is (kind is not None), (sid, view, kind, report)
