"""Frozen-extractor feature cache: CNN features computed once per study, kept in memory (float16).

With ``model.freeze_extractor=true`` the CNN never changes, so recomputing it every epoch only burns
CPU. The cache holds the un-augmented features ``[V, C, h, w]`` of each study; training then runs
the memory, encoder and decoder only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ifnet.data.annotation import Study
from ifnet.data.dataset import ReportDataset, collate
from ifnet.models.ifnet import IFNet
from ifnet.train.config import DataConfig


@dataclass
class FeatureCache:
    features: dict[str, Tensor]  # id -> [V, C, h, w] float16
    masks: dict[str, Tensor]  # id -> [V] bool

    def get(self, study_id: str) -> tuple[Tensor, Tensor]:
        return self.features[study_id], self.masks[study_id]

    @classmethod
    @torch.no_grad()
    def build(cls, model: IFNet, studies: Sequence[Study], d: DataConfig, device: torch.device, *,
              batch_size: int = 32) -> "FeatureCache":
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        from ifnet.train.data import image_config

        ds = ReportDataset(studies, d.image_root, _NullTokenizer(), image_config(d), None, None, train=False)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=d.num_workers, collate_fn=collate)
        feats: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        was_training = model.training
        model.eval()
        for batch in tqdm(loader, desc="caching CNN features", leave=False):
            out = model.extract_features(batch["images"].to(device), batch["view_mask"].to(device))
            for i, sid in enumerate(batch["ids"]):
                feats[sid] = out[i].to("cpu", torch.float16)
                masks[sid] = batch["view_mask"][i].clone()
        model.train(was_training)
        return cls(feats, masks)


class _NullTokenizer:
    """The feature pass needs no tokens; ReportDataset still tokenizes, so give it a trivial encoder."""

    def encode(self, report: str, max_tokens: Optional[int] = None) -> list[int]:
        return [1, 2]
