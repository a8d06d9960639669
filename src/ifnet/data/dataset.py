"""Studies -> training examples -> batches, the same for every dataset.

:class:`ReportDataset` turns each :class:`~ifnet.data.annotation.Study` into a dict (images of its
views, tokens of its report, its labels); :func:`collate` pads a list of them into one batch::

    images      [B, V, 3, S, S] float32   V = most views in the batch; missing views are zeros
    view_mask   [B, V] bool               True where a real view is
    tokens      [B, T] int64              bos ... eos, padded with the tokenizer's pad id (0)
    token_mask  [B, T] bool               True on real tokens (bos and eos included)
    labels      [B, 14] float32           the 14 observations, 0/1; zeros where unknown
    has_labels  [B] bool                  whether the study had labels at all
    ids, reports                          lists of str (reports raw, as in the annotation)

A MIMIC-CXR study with one view and an IU-Xray study with two mix in one batch; the model reads
the view mask and never needs to know which dataset a study came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ifnet.data.annotation import Annotation, Study
from ifnet.data.images import MAX_PIXELS, ImageError, read_xray
from ifnet.data.tokenizer import PAD_ID, Tokenizer
from ifnet.data.transforms import ImageConfig, ImageTransform
from ifnet.io_utils import PathLike
from ifnet.labels import NUM_OBSERVATIONS

__all__ = ["ImageConfig", "ImageTransform", "ReportDataset", "collate", "views_to_tensor"]


def views_to_tensor(views: Sequence[np.ndarray], transform: ImageTransform,
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded views ([H, W] uint8/uint16 each) -> (images [V, 3, S, S], view_mask [V] all True).

    At most ``transform.config.max_views`` views are used (the first ones). This is also what
    ``ifnet generate`` and the server call on an uploaded study, so inference sees training's pixels.
    """
    if not views:
        raise ValueError("a study needs at least one view")
    views = list(views)[: transform.config.max_views]
    images = torch.stack([transform(v, generator) for v in views])
    return images, torch.ones(len(views), dtype=torch.bool)


class ReportDataset(Dataset):
    """Studies as training/evaluation examples (see the module docstring for the item fields).

    ``labels`` maps study id -> 14 0/1 values (:func:`ifnet.data.annotation.load_label_file`);
    studies without an entry get zeros and ``has_labels`` False. ``train`` turns on the random
    crop of :class:`ImageTransform`; its randomness comes from torch's generator (seeded per
    DataLoader worker), or from ``generator`` when given.
    """

    def __init__(self, studies: Sequence[Study], image_root: PathLike, tokenizer: Tokenizer,
                 image_config: Optional[ImageConfig] = None, max_tokens: Optional[int] = 60,
                 labels: Optional[Mapping[str, np.ndarray]] = None, train: bool = False,
                 generator: Optional[torch.Generator] = None, max_pixels: int = MAX_PIXELS) -> None:
        self.studies = list(studies)
        self.image_root = Path(image_root)
        self.tokenizer = tokenizer
        self.image_config = image_config if image_config is not None else ImageConfig()
        self.max_tokens = max_tokens
        self.train = train
        self.transform = ImageTransform(self.image_config, train=train)
        # Only for num_workers=0: a Generator copied into several workers would repeat itself there.
        self.generator = generator
        self.max_pixels = max_pixels
        # Tokenize once: cleaning 200k MIMIC reports every epoch would cost more than the images.
        self._tokens = [torch.tensor(tokenizer.encode(s.report, max_tokens), dtype=torch.long)
                        for s in self.studies]
        self._labels: dict[str, torch.Tensor] = {}
        for sid, vec in (labels or {}).items():
            arr = np.asarray(vec, dtype=np.float32)
            if arr.shape != (NUM_OBSERVATIONS,):
                raise ValueError(f"labels for study {sid} have shape {arr.shape}, expected ({NUM_OBSERVATIONS},)")
            self._labels[str(sid)] = torch.from_numpy(arr)

    @classmethod
    def from_annotation(cls, annotation: Annotation, split: str, tokenizer: Tokenizer,
                        **kwargs: Any) -> "ReportDataset":
        """The dataset of one split of a loaded annotation, with its image folder."""
        if annotation.image_root is None:
            raise ValueError(f"{annotation.path}: no image folder known; pass image_root to load_annotation")
        return cls(annotation.split(split), annotation.image_root, tokenizer, **kwargs)

    def __len__(self) -> int:
        return len(self.studies)

    def load_views(self, study: Study) -> list[np.ndarray]:
        """The decoded views of ``study`` ([H, W] uint8/uint16 each), at most ``max_views``."""
        views = []
        for rel in study.image_paths[: self.image_config.max_views]:
            path = self.image_root / rel
            try:
                views.append(read_xray(path, max_pixels=self.max_pixels))
            except ImageError as e:
                # Name the study too: the user fixes the annotation entry, not just the file.
                raise ImageError(e.path, e.detail, record=study.id, field="image_path") from None
        return views

    def __getitem__(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        images, view_mask = views_to_tensor(self.load_views(study), self.transform, self.generator)
        labels = self._labels.get(study.id)
        return {
            "id": study.id,
            "images": images,                      # [V, 3, S, S]
            "view_mask": view_mask,                # [V]
            "tokens": self._tokens[index],         # [T]
            "report": study.report,
            "labels": labels if labels is not None else torch.zeros(NUM_OBSERVATIONS),
            "has_labels": torch.tensor(labels is not None),
        }


def collate(batch: Sequence[Mapping[str, Any]], pad_id: int = PAD_ID) -> dict[str, Any]:
    """Pad items of :class:`ReportDataset` into one batch (shapes in the module docstring)."""
    if not batch:
        raise ValueError("collate got an empty batch")
    shapes = {tuple(item["images"].shape[1:]) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"all views in a batch must have the same [C, H, W]; got {sorted(shapes)}")
    (c, h, w), = shapes
    n = len(batch)
    max_views = max(item["images"].shape[0] for item in batch)
    max_len = max(item["tokens"].shape[0] for item in batch)

    images = torch.zeros(n, max_views, c, h, w, dtype=batch[0]["images"].dtype)
    view_mask = torch.zeros(n, max_views, dtype=torch.bool)
    tokens = torch.full((n, max_len), pad_id, dtype=torch.long)
    token_mask = torch.zeros(n, max_len, dtype=torch.bool)
    for i, item in enumerate(batch):
        v, t = item["images"].shape[0], item["tokens"].shape[0]
        images[i, :v] = item["images"]
        view_mask[i, :v] = item["view_mask"]
        tokens[i, :t] = item["tokens"]
        token_mask[i, :t] = True
    return {
        "ids": [item["id"] for item in batch],
        "reports": [item["report"] for item in batch],
        "images": images,
        "view_mask": view_mask,
        "tokens": tokens,
        "token_mask": token_mask,
        "labels": torch.stack([item["labels"].to(torch.float32) for item in batch]),
        "has_labels": torch.stack([torch.as_tensor(item["has_labels"], dtype=torch.bool) for item in batch]),
    }
