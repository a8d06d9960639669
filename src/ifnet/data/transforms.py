"""From a decoded X-ray to the model's input tensor: IEC, resize, crop, normalise.

One view goes through :class:`ImageTransform`::

    read_xray(path)            [H, W] uint8 | uint16, full resolution
    -> IEC (none/clahe/adaptive), on the full-resolution image, same dtype
    -> float in [0, 1]         (/ 255 or / 65535: no 8-bit bottleneck for 16-bit sources)
    -> resize (antialiased bilinear)
         eval:  to (image_size, image_size)
         train: to (resize_size, resize_size), then a random image_size crop
    -> 3 channels by replication, ImageNet mean/std
    = [3, image_size, image_size] float32

The enhancement runs before resizing and on exactly what ``read_xray`` returns, which is what
``ifnet enhance`` does before writing its lossless PNG. So training on an ``ifnet enhance`` folder
with ``iec: none`` and training on the original folder with ``iec: clahe`` feed the model the same
tensors.

No horizontal flip, unlike R2Gen's ``RandomHorizontalFlip``: a mirrored chest film puts the heart
on the right, and the report still says "left pleural effusion" or "left-sided catheter", so the
flip teaches the model to contradict its own image. The crop is the only augmentation.

Randomness comes from a ``torch.Generator`` (or, when none is passed, torch's default generator,
which the DataLoader seeds per worker from its own generator), never from numpy's global state, so
``torch.manual_seed`` / ``DataLoader(generator=...)`` make a run reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IEC_MODES: tuple[str, ...] = ("none", "clahe", "adaptive")


@dataclass
class ImageConfig:
    """How studies become ``images[V, 3, S, S]``. Filled from the ``data`` section of a run config."""

    #: Side S of the square model input. 224 is what the ImageNet backbones were trained at.
    image_size: int = 224
    #: Views kept per study (the first ones in annotation order). IU-Xray has 2; MIMIC-CXR studies
    #: with more views are cut here, with fewer they are padded and masked by collate.
    max_views: int = 2
    #: On-the-fly image enhancement: "none", "clahe" or "adaptive" (CLAHE only on images judged
    #: low quality). Same transform as ``ifnet enhance``.
    iec: Literal["none", "clahe", "adaptive"] = "none"
    #: CLAHE clip limit (OpenCV clipLimit); 1.7 is the paper's value.
    clip_limit: float = 1.7
    #: CLAHE tiles per side.
    tile_grid: int = 8
    #: Random crop when training (R2Gen: resize to 256, crop 224). False: train on the eval transform.
    train_augment: bool = True
    #: Side before the random training crop; None means image_size * 256/224 rounded (256 for 224).
    resize_size: Optional[int] = None
    #: Per-channel normalisation of the replicated gray image; ImageNet's, as the backbones expect.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        if isinstance(self.max_views, bool) or not isinstance(self.max_views, int) or self.max_views < 1:
            raise ValueError(f"max_views must be a positive integer, got {self.max_views!r}")
        if self.iec not in IEC_MODES:
            raise ValueError(f"iec must be one of {', '.join(IEC_MODES)}, got {self.iec!r}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 values (one per channel), got {value!r}")
            setattr(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std!r}")

    @property
    def train_resize(self) -> int:
        """Side the training image is resized to before the random crop."""
        if self.resize_size is not None:
            return self.resize_size
        return int(round(self.image_size * 256 / 224))


def to_unit_float(img: np.ndarray) -> torch.Tensor:
    """[H, W] uint8/uint16 -> [H, W] float32 in [0, 1] (divided by the dtype's maximum)."""
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise TypeError(f"expected a uint8 or uint16 image, got {img.dtype}")
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image [H, W], got shape {img.shape}")
    return torch.from_numpy(img.astype(np.float32) / np.float32(scale))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W] -> [size, size], bilinear with antialiasing (a 3000-pixel film shrunk to 224 without
    antialiasing aliases fine lines such as catheters and rib edges)."""
    if x.shape == (size, size):
        return x
    out = F.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0]


class ImageTransform:
    """One view: [H, W] uint8/uint16 -> [3, S, S] float32 (see the module docstring).

    ``train`` enables the random crop (if ``config.train_augment``). Picklable, for DataLoader workers.
    """

    def __init__(self, config: ImageConfig, train: bool = False) -> None:
        self.config = config
        self.random_crop = bool(train and config.train_augment)
        self._enhancer = None
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)

    def enhance(self, img: np.ndarray) -> np.ndarray:
        """The IEC step alone: [H, W] -> [H, W], same dtype (identity for ``iec: none``)."""
        if self.config.iec == "none":
            return img
        if self._enhancer is None:
            # Imported here so that the data pipeline works without OpenCV when IEC is off.
            from ifnet.iec.clahe import build_enhancer

            self._enhancer = build_enhancer(self.config.iec, self.config.clip_limit, self.config.tile_grid)
        return self._enhancer(img)

    def __call__(self, img: np.ndarray, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.to_tensor(self.enhance(img), generator)

    def to_tensor(self, img: np.ndarray, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The steps after IEC: [H, W] (already enhanced) -> [3, S, S] normalised (crop when training)."""
        size = self.config.image_size
        x = to_unit_float(img)
        if self.random_crop:
            big = self.config.train_resize
            x = resize(x, big)
            top, left = (int(v) for v in torch.randint(0, big - size + 1, (2,), generator=generator))
            x = x[top:top + size, left:left + size]
        else:
            x = resize(x, size)
        return (x.expand(3, size, size) - self._mean) / self._std
