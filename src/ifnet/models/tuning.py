"""Top tuning: fine-tune the last stage of a pretrained CNN trunk on cached activations, on a CPU.

A frozen ImageNet trunk sees chest X-rays through features learnt on photographs; fine-tuning the whole
trunk for every epoch of report training needs a GPU. Top tuning is the CPU-sized middle way:

1. the trunk is split where its stride reaches 32 (:meth:`ifnet.models.visual.VisualExtractor.split`:
   EfficientNet-Lite0 ``blocks[5:]`` + head conv, ResNet ``layer4``);
2. the *bottom* runs once per image and its activations are kept (the caller caches them: 112 x 14 x 14
   per view for EfficientNet-Lite0 at 224 px);
3. the *top*, with a linear multi-label head on its view-pooled features, is trained on those
   activations against label targets of the training studies (binary cross-entropy; AdamW; the top's
   BatchNorm keeps its ImageNet running statistics; the activation map is shifted by up to ``shift`` cells
   at random as augmentation);
4. after each epoch the head is scored on the *validation* studies (mean ROC AUC over the ``select``
   columns against ``y_val``) and the best epoch's top is kept. Nothing else is looked at. Whether the
   tuned trunk is better than the pretrained one at all is the caller's question, to be answered on
   validation too (the benchmark compares a label probe on both trunks' features).

The tuned trunk is an ordinary extractor: :meth:`~ifnet.models.visual.VisualExtractor.trunk_state_dict`
gives it in the naming that ``model.weights_path`` loads, so a model trained on the tuned features carries
the same trunk in its checkpoint and reads new X-rays exactly as its training features were made.
The quality benchmark uses it (``benchmarks/bench_quality.py``; results in docs/RESULTS.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ifnet.models.visual import VisualExtractor

__all__ = ["TopTuningConfig", "TuningResult", "TopWithHead", "tune_top", "pool_views", "apply_per_study"]


@dataclass
class TopTuningConfig:
    epochs: int = 5
    lr: float = 3e-5  # the tuned stages: small, they start from ImageNet weights
    head_lr: float = 1e-3  # the new linear head
    weight_decay: float = 1e-2
    batch_size: int = 32  # studies
    dropout: float = 0.3  # on the pooled features, before the head
    shift: int = 1  # random roll of the activation map by up to this many cells (0: none)
    seed: int = 0

    def __post_init__(self) -> None:
        import math

        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"top tuning {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"top tuning {name} must be a finite number > 0, got {value}")
        if not (self.weight_decay >= 0 and 0 <= self.dropout < 1 and self.shift >= 0):
            raise ValueError("top tuning needs weight_decay >= 0, dropout in [0, 1) and shift >= 0")


@dataclass
class TuningResult:
    best_epoch: int
    best_val_mean_auc: float
    history: list[dict] = field(default_factory=list)  # per epoch: loss, val_mean_auc, seconds
    config: dict = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def apply_per_study(module: nn.Module, studies: Iterable[tuple[str, Tensor]], *, batch_size: int = 16,
                    channels_last: bool = False) -> dict[str, Tensor]:
    """Run ``module`` over each study's views: ``(id, [v, ...])`` pairs -> id -> float16 outputs ``[v, ...]``.

    The views of ``batch_size`` studies go through ``module`` as one batch (``studies`` may be a generator
    that reads images lazily); ``channels_last`` lays the batch out for a channels-last module.
    """
    out: dict[str, Tensor] = {}
    chunk: list[tuple[str, Tensor]] = []

    def flush() -> None:
        x = torch.cat([views.float() for _, views in chunk])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = module(x).to(torch.float16).contiguous()
        offset = 0
        for sid, views in chunk:
            out[sid] = y[offset:offset + views.shape[0]].clone()
            offset += views.shape[0]
        chunk.clear()

    for item in studies:
        chunk.append(item)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    return out


def pool_views(features: Tensor, mask: Tensor) -> Tensor:
    """``features [B, V, C, h, w]``, ``mask [B, V]`` -> ``[B, V*C]``: mean over patches, absent views zero."""
    pooled = features.mean(dim=(3, 4)) * mask[..., None].to(features.dtype)
    return pooled.reshape(features.shape[0], -1)


class TopWithHead(nn.Module):
    """The trunk's top stages and a linear head on the view-pooled features (the head is thrown away)."""

    def __init__(self, top: nn.Module, channels: int, views: int, outputs: int, dropout: float) -> None:
        super().__init__()
        self.top = top
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(views * channels, outputs)

    def forward(self, mid: Tensor, mask: Tensor) -> Tensor:
        """``mid [B, V, C', h', w']`` bottom activations -> logits ``[B, outputs]``."""
        b, v = mid.shape[:2]
        feats = self.top(mid.flatten(0, 1))
        feats = feats.reshape(b, v, *feats.shape[1:])
        return self.head(self.drop(pool_views(feats, mask)))


def _stack(items: Sequence[Tensor], views: int) -> tuple[Tensor, Tensor]:
    """Pad each study's ``[v, C, h, w]`` to ``views`` with zeros -> ``[B, views, C, h, w]`` and mask."""
    first = items[0]
    out = torch.zeros(len(items), views, *first.shape[1:], dtype=torch.float32)
    mask = torch.zeros(len(items), views, dtype=torch.bool)
    for i, x in enumerate(items):
        v = min(views, x.shape[0])
        out[i, :v] = x[:v].float()
        mask[i, :v] = True
    return out, mask


def _mean_auc(y: np.ndarray, p: np.ndarray) -> float:
    from ifnet.baselines import roc_auc

    aucs = [roc_auc(y[:, j], p[:, j]) for j in range(y.shape[1])]
    return float(np.nanmean(aucs))


def tune_top(extractor: VisualExtractor, mid_train: Sequence[Tensor], y_train: np.ndarray,
             mid_val: Sequence[Tensor], y_val: np.ndarray, select: Sequence[int], *,
             views: int = 2, config: Optional[TopTuningConfig] = None, at: Optional[int] = None,
             log: Optional[callable] = None) -> TuningResult:
    """Train ``extractor``'s top on bottom activations; leave it holding the best validation epoch's weights.

    ``mid_train`` / ``mid_val``: per study ``[v, C', h', w']`` activations of the bottom (``extractor.split(at)``);
    ``y_train [N, K]``: 0/1 targets of the head; ``y_val [M, len(select)]``: validation labels compared with the
    head's ``select`` columns (mean ROC AUC; the only thing that chooses the epoch). The extractor is left
    frozen again (eval mode, no gradients) with the chosen weights.
    """
    cfg = config or TopTuningConfig()
    if cfg.epochs < 1:
        raise ValueError(f"top tuning needs at least one epoch, got {cfg.epochs}")
    if len(mid_train) != len(y_train) or len(mid_val) != len(y_val):
        raise ValueError("one target row per study is needed: "
                         f"{len(mid_train)} vs {len(y_train)} train, {len(mid_val)} vs {len(y_val)} val")
    if y_val.shape[1] != len(select):
        raise ValueError(f"y_val has {y_val.shape[1]} columns but select names {len(select)}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    _, top = extractor.split(at)
    top.requires_grad_(True)
    channels = extractor.out_channels
    torch.manual_seed(cfg.seed)  # the head's initialisation and dropout
    model = TopWithHead(top, channels, views, y_train.shape[1], cfg.dropout)
    opt = torch.optim.AdamW([{"params": model.top.parameters(), "lr": cfg.lr},
                             {"params": model.head.parameters(), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    targets = torch.as_tensor(np.asarray(y_train), dtype=torch.float32)
    select_idx = list(select)

    def val_auc() -> float:
        model.eval()
        probs = []
        with torch.no_grad():
            for s in range(0, len(mid_val), 64):
                x, m = _stack(mid_val[s:s + 64], views)
                probs.append(torch.sigmoid(model(x, m))[:, select_idx].numpy())
        return _mean_auc(np.asarray(y_val), np.concatenate(probs))

    best_auc, best_epoch, best_state = -1.0, 0, None
    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        model.train()
        for m in model.top.modules():  # BatchNorm keeps its running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        order = torch.randperm(len(mid_train), generator=gen).tolist()
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            x, m = _stack([mid_train[i] for i in idx], views)
            if cfg.shift:
                dy, dx = (int(v) for v in rng.integers(-cfg.shift, cfg.shift + 1, size=2))
                x = torch.roll(x, (dy, dx), dims=(3, 4))
            loss = F.binary_cross_entropy_with_logits(model(x, m), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        auc = val_auc()
        history.append({"epoch": epoch, "loss": total / len(order), "val_mean_auc": auc,
                        "seconds": time.time() - te})
        if log:
            log(f"top tuning: epoch {epoch} loss {total / len(order):.4f} validation mean AUC {auc:.4f} "
                f"({time.time() - te:.0f} s)")
        if best_state is None or auc > best_auc:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(top.state_dict())
    top.load_state_dict(best_state)
    extractor.freeze()
    extractor.eval()
    return TuningResult(best_epoch=best_epoch, best_val_mean_auc=best_auc, history=history,
                        config=asdict(cfg), seconds=time.time() - t0)
