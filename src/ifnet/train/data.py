"""DataLoaders for training and validation: image datasets or cached CNN features, DDP-aware."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ifnet.data.annotation import Study
from ifnet.data.dataset import ReportDataset, collate
from ifnet.data.tokenizer import PAD_ID, Tokenizer
from ifnet.data.transforms import ImageConfig
from ifnet.labels import NUM_OBSERVATIONS
from ifnet.train.config import DataConfig
from ifnet.train.distributed import DistInfo


def image_config(d: DataConfig) -> ImageConfig:
    return ImageConfig(image_size=d.image_size, max_views=d.max_views, iec=d.iec, clip_limit=d.clip_limit,
                       tile_grid=d.tile_grid, train_augment=d.train_augment)


class CachedFeatureDataset(Dataset):
    """Like :class:`ReportDataset` but yields cached backbone ``features [V, C, h, w]`` instead of images."""

    def __init__(self, studies: Sequence[Study], tokenizer: Tokenizer, max_tokens: Optional[int],
                 labels: Optional[Mapping[str, np.ndarray]], cache: "Any") -> None:
        self.studies = list(studies)
        self.cache = cache
        self._tokens = [torch.tensor(tokenizer.encode(s.report, max_tokens), dtype=torch.long) for s in self.studies]
        self._labels = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in (labels or {}).items()}

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        feats, mask = self.cache.get(study.id)
        labels = self._labels.get(study.id)
        return {"id": study.id, "features": feats, "view_mask": mask, "tokens": self._tokens[index],
                "report": study.report,
                "labels": labels if labels is not None else torch.zeros(NUM_OBSERVATIONS),
                "has_labels": torch.tensor(labels is not None)}


def collate_features(batch: Sequence[Mapping[str, Any]], pad_id: int = PAD_ID) -> dict[str, Any]:
    n = len(batch)
    max_views = max(item["features"].shape[0] for item in batch)
    c, h, w = batch[0]["features"].shape[1:]
    max_len = max(item["tokens"].shape[0] for item in batch)
    features = torch.zeros(n, max_views, c, h, w, dtype=batch[0]["features"].dtype)
    view_mask = torch.zeros(n, max_views, dtype=torch.bool)
    tokens = torch.full((n, max_len), pad_id, dtype=torch.long)
    for i, item in enumerate(batch):
        v, t = item["features"].shape[0], item["tokens"].shape[0]
        features[i, :v] = item["features"]
        view_mask[i, :v] = item["view_mask"]
        tokens[i, :t] = item["tokens"]
    return {"ids": [b["id"] for b in batch], "reports": [b["report"] for b in batch], "features": features,
            "view_mask": view_mask, "tokens": tokens, "token_mask": tokens != pad_id,
            "labels": torch.stack([b["labels"].float() for b in batch]),
            "has_labels": torch.stack([torch.as_tensor(b["has_labels"], dtype=torch.bool) for b in batch])}


def make_dataset(studies: Sequence[Study], d: DataConfig, tokenizer: Tokenizer,
                 labels: Optional[Mapping[str, np.ndarray]], *, train: bool, feature_cache: Any = None) -> Dataset:
    if feature_cache is not None:
        return CachedFeatureDataset(studies, tokenizer, d.max_tokens, labels, feature_cache)
    return ReportDataset(studies, d.image_root, tokenizer, image_config(d), d.max_tokens, labels, train=train)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy follows torch so any numpy
    # randomness in transforms is reproducible too.
    np.random.seed(torch.initial_seed() % (2**32))


def build_loader(ds: Dataset, d: DataConfig, *, train: bool, seed: int, dist: Optional[DistInfo] = None,
                 batch_size: Optional[int] = None) -> DataLoader:
    """Shuffled, seeded loader for training (a DistributedSampler under torchrun); ordered otherwise."""
    g = torch.Generator()
    g.manual_seed(seed)
    sampler = None
    if dist is not None and dist.enabled and train:
        sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    workers = 0 if isinstance(ds, CachedFeatureDataset) else d.num_workers
    return DataLoader(ds, batch_size=batch_size or d.batch_size, shuffle=train and sampler is None,
                      sampler=sampler, num_workers=workers, generator=g, worker_init_fn=_seed_worker,
                      collate_fn=collate_features if isinstance(ds, CachedFeatureDataset) else collate,
                      drop_last=False, persistent_workers=False)
