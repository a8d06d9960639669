"""CLAHE transforms: exact agreement with OpenCV, hand-computed values, validation, the registry."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from ifnet.errors import IFNetError
from ifnet.iec import (
    CLAHE,
    AdaptiveCLAHE,
    EnhancementConfigError,
    NoEnhancement,
    build_enhancer,
)


def hand_made_uint8() -> np.ndarray:
    """20 x 24: a diagonal ramp with a bright square and a dark stripe (not a multiple of 8)."""
    r, c = np.mgrid[0:20, 0:24]
    img = (r * 5 + c * 3 + 40).astype(np.uint8)
    img[4:9, 10:16] = 230
    img[:, 2] = 7
    return img


def opencv_direct(img: np.ndarray, clip: float, grid: int) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(img)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("clip,grid", [(1.7, 8), (3.0, 4), (1.0, 1)])
def test_equals_opencv_called_directly(dtype, clip, grid):
    img = hand_made_uint8().astype(dtype)
    if dtype == np.uint16:
        img = img * np.uint16(257) + np.uint16(3)  # uses the 16-bit range, not just 8 bits in 16
    out = CLAHE(clip_limit=clip, tile_grid=grid)(img)
    assert out.dtype == dtype and out.shape == img.shape
    if dtype == np.uint16:  # equalised on 256 grey levels: OpenCV's 8-bit CLAHE of the top 8 bits, x 257
        top = (img >> 8).astype(np.uint8)
        np.testing.assert_array_equal(out, opencv_direct(top, clip, grid).astype(np.uint16) * 257)
    else:
        np.testing.assert_array_equal(out, opencv_direct(img, clip, grid))
    assert not np.array_equal(out, img)  # it did something


@pytest.mark.parametrize("clip", [1.0, 1.7, 4.0])
def test_sixteen_bit_copy_of_an_image_gives_the_same_pixels(clip):
    # The same X-ray as an 8-bit PNG and as a 16-bit PNG or DICOM (x 257) must reach the model identically.
    # OpenCV's own 16-bit CLAHE does not: with 65,536 bins its clip limit floors at one count per bin.
    img8 = cv2.resize(hand_made_uint8(), (256, 256), interpolation=cv2.INTER_LINEAR)
    img16 = img8.astype(np.uint16) * np.uint16(257)
    out8, out16 = CLAHE(clip_limit=clip)(img8), CLAHE(clip_limit=clip)(img16)
    np.testing.assert_array_equal(out16, out8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(out16 / 65535.0, out8 / 255.0)
    assert not np.array_equal(opencv_direct(img16, clip, 8) // 257, out8)  # what OpenCV alone would give


def test_clip_limit_matters_for_sixteen_bit_images():
    img16 = cv2.resize(hand_made_uint8(), (256, 256)).astype(np.uint16) * np.uint16(257)
    assert not np.array_equal(CLAHE(clip_limit=1.0)(img16), CLAHE(clip_limit=40.0)(img16))


def test_defaults_are_the_papers():
    assert CLAHE() == CLAHE(clip_limit=1.7, tile_grid=8)


def test_constant_image_hand_computed():
    # 16 x 16 with an 8 x 8 grid: tiles of 2 x 2 = 4 pixels, all in bin 100. The clip limit is
    # max(1, int(1.7 * 4 / 256)) = 1, so 3 counts are clipped and handed out one each to bins 0,
    # 85 and 170 (OpenCV's residual step 256 // 3). The LUT at 100 is the cumulative count up to
    # 100 (bins 0, 85, 100 -> 3) times 255 / 4 = 191.25 -> 191. Every tile is the same, so the
    # bilinear blend is 191 everywhere.
    img = np.full((16, 16), 100, np.uint8)
    np.testing.assert_array_equal(CLAHE()(img), np.full((16, 16), 191, np.uint8))
    # Without clipping (limit far above the tile area) it is plain equalisation: 4 * 255 / 4.
    np.testing.assert_array_equal(CLAHE(clip_limit=1000.0)(img), np.full((16, 16), 255, np.uint8))


def test_constant_image_hand_computed_uint16():
    # 25700 = 100 x 257 rounds to grey level 100, which the 8-bit case above maps to 191; back to 16 bits
    # that is 191 x 257 = 49087.
    img = np.full((16, 16), 25700, np.uint16)
    np.testing.assert_array_equal(CLAHE()(img), np.full((16, 16), 49087, np.uint16))


def test_non_contiguous_input_and_input_not_modified():
    base = hand_made_uint8()
    view = np.repeat(base, 2, axis=1)[:, ::2]  # a strided view equal to base
    assert not view.flags["C_CONTIGUOUS"]
    before = view.copy()
    np.testing.assert_array_equal(CLAHE()(view), CLAHE()(base))
    np.testing.assert_array_equal(view, before)


def test_tiny_images_keep_shape():
    for shape in [(1, 1), (3, 5), (7, 2)]:
        img = (np.arange(np.prod(shape)) * 37 % 256).astype(np.uint8).reshape(shape)
        assert CLAHE()(img).shape == shape


@pytest.mark.parametrize("bad,words", [
    (np.zeros((8, 8, 3), np.uint8), "grayscale"),
    (np.zeros((8,), np.uint8), "2-D"),
    (np.zeros((8, 8), np.float32), "float32"),
    (np.zeros((8, 8), np.int16), "int16"),
    (np.zeros((8, 8), ">u2"), "uint8 or uint16"),  # big-endian would be misread by OpenCV
    (np.zeros((0, 8), np.uint8), "empty"),
    ([[1, 2], [3, 4]], "numpy array"),
])
@pytest.mark.parametrize("transform", [CLAHE(), AdaptiveCLAHE(), NoEnhancement()])
def test_rejects_bad_images_clearly(transform, bad, words):
    with pytest.raises(ValueError, match=words):
        transform(bad)


@pytest.mark.parametrize("kwargs", [
    {"clip_limit": 0}, {"clip_limit": -1.0}, {"clip_limit": float("nan")},
    {"clip_limit": float("inf")}, {"clip_limit": True}, {"clip_limit": "1.7"},
    {"tile_grid": 0}, {"tile_grid": 2.5}, {"tile_grid": True},
])
@pytest.mark.parametrize("cls", [CLAHE, AdaptiveCLAHE])
def test_rejects_bad_parameters(cls, kwargs):
    with pytest.raises(EnhancementConfigError) as info:
        cls(**kwargs)
    # Both a user-facing one-liner for the CLI and a ValueError for library callers.
    assert isinstance(info.value, IFNetError) and isinstance(info.value, ValueError)
    assert next(iter(kwargs)) in str(info.value)


def test_build_enhancer_registry():
    img = hand_made_uint8()
    none = build_enhancer("none")
    assert none(img) is img
    clahe = build_enhancer("clahe", clip_limit=2.5, tile_grid=4)
    assert clahe == CLAHE(2.5, 4)
    np.testing.assert_array_equal(clahe(img), opencv_direct(img, 2.5, 4))
    assert build_enhancer("adaptive", 2.0, 6) == AdaptiveCLAHE(2.0, 6)
    with pytest.raises(EnhancementConfigError, match="unknown enhancement 'CLAHE'.*none, clahe, adaptive"):
        build_enhancer("CLAHE")
    with pytest.raises(EnhancementConfigError, match="clip_limit"):
        build_enhancer("none", clip_limit=-1)


def test_transforms_pickle_for_worker_processes():
    for t in (CLAHE(2.0, 4), AdaptiveCLAHE(), NoEnhancement()):
        assert pickle.loads(pickle.dumps(t)) == t


def test_adaptive_enhances_low_quality_only():
    # Low contrast: values 100..140 of 255 (black level 0.39, white level 0.55) -> CLAHE applied.
    low = (100 + hand_made_uint8() % 41).astype(np.uint8)
    adaptive = AdaptiveCLAHE()
    out, verdict = adaptive.apply_and_judge(low)
    assert verdict.low_quality
    np.testing.assert_array_equal(out, CLAHE()(low))
    np.testing.assert_array_equal(adaptive(low), CLAHE()(low))
    # Full range 0..255 -> judged normal, returned as is (the same object, no copy).
    normal = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    assert not adaptive.judge(normal).low_quality
    assert adaptive(normal) is normal
