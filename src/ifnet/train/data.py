"""DataLoaders for training and validation: image datasets or cached CNN features, DDP-aware."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per-study repeat factors of LVIS repeat-factor sampling (Gupta et al., 2019) for ``labels [N, L]`` 0/1.

    A finding present in a fraction ``f`` of the training studies has ``r = max(1, sqrt(threshold / f))``;
    a study repeats by the largest ``r`` among its findings (1 for a study with none). Findings rarer than
    ``threshold`` are thus seen more often, and common ones, and normal studies, as before. Pass only the
    findings (IU-Xray: the 13 observations other than No Finding): "normal" is not a rare class to boost.
    """
    labels = np.asarray(labels) > 0.5
    if labels.ndim != 2:
        raise ValueError(f"labels must be [N, L], got shape {labels.shape}")
    if not threshold > 0:
        raise ValueError(f"repeat threshold must be > 0, got {threshold}")
    freq = labels.mean(axis=0)
    per_label = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    per_label = np.maximum(per_label, 1.0)
    return np.where(labels, per_label[None, :], 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler(Sampler[int]):
    """Shuffled epochs in which study ``i`` appears ``factors[i]`` times on average (stochastic rounding).

    The epoch's draw is a function of ``(seed, epoch)`` alone (call :meth:`set_epoch`, as the trainer does),
    so a resumed run sees the same epochs. Under DDP each of ``num_replicas`` ranks takes every
    ``num_replicas``-th index of the same shuffled list, padded to equal length as DistributedSampler does.
    """

    def __init__(self, factors: np.ndarray, *, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.factors = np.asarray(factors, dtype=np.float64)
        if self.factors.ndim != 1 or (self.factors < 1).any():
            raise ValueError("repeat factors must be a 1-D array of values >= 1")
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, int(epoch)])
        whole = np.floor(self.factors)
        counts = whole + (rng.random(len(self.factors)) < self.factors - whole)
        order = np.repeat(np.arange(len(self.factors)), counts.astype(np.int64))
        rng.shuffle(order)
        if self.num_replicas > 1:
            order = np.resize(order, -(-len(order) // self.num_replicas) * self.num_replicas)
            order = order[self.rank::self.num_replicas]
        self._order = order.tolist()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy follows torch so any numpy
    # randomness in transforms is reproducible too.
    np.random.seed(torch.initial_seed() % (2**32))


def build_loader(ds: Dataset, d: DataConfig, *, train: bool, seed: int, dist: Optional[DistInfo] = None,
                 batch_size: Optional[int] = None, factors: Optional[np.ndarray] = None) -> DataLoader:
    """Shuffled, seeded loader for training (a DistributedSampler under torchrun); ordered otherwise.
    ``factors`` (training only): per-study repeat factors for a :class:`RepeatFactorSampler`."""
    g = torch.Generator()
    g.manual_seed(seed)
    sampler: Optional[Sampler[int]] = None
    if factors is not None and train:
        world = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
        sampler = RepeatFactorSampler(factors, seed=seed, num_replicas=world[0], rank=world[1])
    elif dist is not None and dist.enabled and train:
        sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    workers = 0 if isinstance(ds, CachedFeatureDataset) else d.num_workers
    return DataLoader(ds, batch_size=batch_size or d.batch_size, shuffle=train and sampler is None,
                      sampler=sampler, num_workers=workers, generator=g, worker_init_fn=_seed_worker,
                      collate_fn=collate_features if isinstance(ds, CachedFeatureDataset) else collate,
                      drop_last=False, persistent_workers=False)
