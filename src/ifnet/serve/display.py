"""Images for the web page: small 8-bit PNGs as data URLs (original, enhanced, heatmap overlay)."""

from __future__ import annotations

import base64
import io

import numpy as np

from ifnet.data.images import to_uint8


def fit_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """[H, W] -> [h, w] with the long side at most ``max_side`` (area averaging), same dtype."""
    import cv2

    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def gray_png(img: np.ndarray) -> bytes:
    """[H, W] uint8/uint16 -> 8-bit grayscale PNG bytes (fast compression: it travels once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def view_images(original: np.ndarray, enhanced: np.ndarray, max_side: int) -> dict[str, str]:
    """Original and enhanced view, downscaled for display, as PNG data URLs."""
    return {"original": png_data_url(gray_png(fit_side(original, max_side))),
            "enhanced": png_data_url(gray_png(fit_side(enhanced, max_side)))}


def heatmap_image(original: np.ndarray, heat: np.ndarray, max_side: int) -> str:
    """The heatmap over the downscaled original, as a PNG data URL."""
    import cv2

    from ifnet.inference import heatmap_overlay_png

    small = fit_side(original, max_side)
    heat_small = cv2.resize(heat.astype(np.float32), (small.shape[1], small.shape[0]),
                            interpolation=cv2.INTER_LINEAR)
    return png_data_url(heatmap_overlay_png(small, heat_small, display_size=False))
