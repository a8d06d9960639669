"""Frozen EfficientNet-Lite0 features of every study, once per IEC variant, cached on disk.

Each image is read once and goes through the project's own eval transform
(:class:`ifnet.data.transforms.ImageTransform`, no augmentation) twice: without enhancement and with
CLAHE. The adaptive variant needs no third CNN pass: :class:`ifnet.iec.AdaptiveCLAHE` returns the image
unchanged when its criterion judges it normal and CLAHE's output when it judges it low quality, and the
eval transform is deterministic, so its features are exactly the ``none`` features of judged-normal views
and the ``clahe`` features of judged-low ones. The per-view verdicts are kept too (they are reported).

The CNN is the trunk IFNet builds (:func:`ifnet.models.visual.create_extractor`) in channels-last
layout, which is about twice as fast on CPU and gives the same features up to float rounding.
Features are stored as float16 ``[V, C, h, w]`` per study in one safetensors file per variant.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ifnet.data.annotation import Study
from ifnet.data.images import read_xray
from ifnet.data.transforms import ImageConfig, ImageTransform
from ifnet.iec.clahe import CLAHE, AdaptiveCLAHE

FORMAT = 1  # bump when what is stored changes


@dataclass
class FeatureSet:
    """Features of one IEC variant: id -> [V, C, h, w] float16, id -> [V] bool view mask."""

    features: dict[str, Tensor]
    masks: dict[str, Tensor]

    def get(self, study_id: str) -> tuple[Tensor, Tensor]:  # the trainer's FeatureCache protocol
        return self.features[study_id], self.masks[study_id]

    def pooled(self, ids: Sequence[str]) -> np.ndarray:
        """Mean over patches, per view, views concatenated: ``[N, V*C]`` float32 (missing views zero)."""
        rows = []
        for sid in ids:
            f = self.features[sid].float().mean(dim=(2, 3))  # [V, C]
            f = f * self.masks[sid][:, None].float()
            rows.append(f.reshape(-1).numpy())
        return np.stack(rows)


class _TwoWay(Dataset):
    """Each study's views, unenhanced and CLAHE-enhanced, plus the adaptive criterion's verdicts."""

    def __init__(self, studies: Sequence[Study], image_root: Path, cfg: ImageConfig, with_clahe: bool) -> None:
        self.studies, self.root, self.with_clahe = list(studies), image_root, with_clahe
        self.transform = ImageTransform(cfg, train=False)
        self.clahe = CLAHE(cfg.clip_limit, cfg.tile_grid)
        self.adaptive = AdaptiveCLAHE(cfg.clip_limit, cfg.tile_grid)
        self.max_views = cfg.max_views

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict:
        study = self.studies[i]
        plain, enhanced, low = [], [], []
        for rel in study.image_paths[: self.max_views]:
            img = read_xray(self.root / rel)
            plain.append(self.transform.to_tensor(img))
            if self.with_clahe:
                enhanced.append(self.transform.to_tensor(self.clahe(img)))
            low.append(self.adaptive.judge(img).low_quality)
        out = {"id": study.id, "none": torch.stack(plain), "low": torch.tensor(low)}
        if self.with_clahe:
            out["clahe"] = torch.stack(enhanced)
        return out


def fingerprint(studies: Sequence[Study], image_root: Path, cfg: ImageConfig, extractor: str) -> str:
    """Changes when the study list, any image file's size/mtime, or a preprocessing setting changes."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "extractor": extractor, "size": cfg.image_size, "views": cfg.max_views,
                         "clip": cfg.clip_limit, "tile": cfg.tile_grid,
                         "criterion": AdaptiveCLAHE().criterion.describe()}, sort_keys=True).encode())
    for s in studies:
        h.update(s.id.encode())
        for rel in s.image_paths[: cfg.max_views]:
            st = (image_root / rel).stat()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def compute_shard(studies: Sequence[Study], image_root: Path, cfg: ImageConfig, out_prefix: Path,
                  with_clahe: bool = True, extractor: str = "efficientnet_lite0") -> float:
    """Worker job: features of ``studies`` written to ``<out_prefix>-{none,clahe}.safetensors`` and
    ``<out_prefix>-low.json``. Images are read in this process (no DataLoader workers): the benchmark runs
    one such job per core. Returns the seconds taken."""
    from safetensors.torch import save_file

    t0 = time.time()
    ds = _TwoWay(studies, image_root, cfg, with_clahe)
    sets, low = compute_features_from(ds, with_clahe=with_clahe, extractor=extractor)
    for kind in (("none", "clahe") if with_clahe else ("none",)):
        save_file(sets[kind], f"{out_prefix}-{kind}.safetensors")
    Path(f"{out_prefix}-low.json").write_text(json.dumps(low))
    return time.time() - t0


@torch.no_grad()
def compute_features_from(ds: "_TwoWay", *, with_clahe: bool, extractor: str, batch_size: int = 16
                          ) -> tuple[dict[str, dict[str, Tensor]], dict[str, list[bool]]]:
    from ifnet.models.visual import create_extractor

    net = create_extractor(extractor, pretrained=True, freeze=True).eval().to(memory_format=torch.channels_last)
    kinds = ("none", "clahe") if with_clahe else ("none",)
    feats: dict[str, dict[str, Tensor]] = {k: {} for k in kinds}
    low: dict[str, list[bool]] = {}
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        for kind in kinds:
            x = torch.cat([it[kind] for it in items]).contiguous(memory_format=torch.channels_last)
            y = net.forward_features(x).to(torch.float16).contiguous()
            offset = 0
            for it in items:
                v = it[kind].shape[0]
                feats[kind][it["id"]] = y[offset:offset + v].clone()
                offset += v
        for it in items:
            low[it["id"]] = [bool(b) for b in it["low"]]
    return feats, low


def assemble(feats: dict[str, dict[str, Tensor]], low: dict[str, list[bool]]) -> dict[str, FeatureSet]:
    """A FeatureSet per stored kind (plus adaptive when none and clahe exist), sharing one mask dict."""
    first = next(iter(feats.values()))
    masks = {sid: torch.ones(f.shape[0], dtype=torch.bool) for sid, f in first.items()}
    sets = {k: FeatureSet(v, masks) for k, v in feats.items()}
    if "clahe" in feats and "none" in feats:
        sets["adaptive"] = FeatureSet({sid: torch.where(torch.tensor(low[sid])[:, None, None, None],
                                                        feats["clahe"][sid], feats["none"][sid])
                                       for sid in feats["none"]}, masks)
    return sets


def load_sets(folder: Path, kinds: Sequence[str] = ("none", "clahe")) -> tuple[dict[str, FeatureSet], dict]:
    """Read every shard in ``folder`` (written by :func:`compute_shard`) -> (FeatureSets, low verdicts)."""
    from safetensors.torch import load_file

    feats: dict[str, dict[str, Tensor]] = {}
    low: dict[str, list[bool]] = {}
    for meta in sorted(folder.glob("shard*-low.json")):
        prefix = str(meta)[: -len("-low.json")]
        low.update(json.loads(meta.read_text()))
        for kind in kinds:
            path = Path(f"{prefix}-{kind}.safetensors")
            if path.exists():
                feats.setdefault(kind, {}).update(load_file(str(path)))
    return assemble(feats, low), low


def blank_features(cfg: ImageConfig, views: int, extractor: str = "efficientnet_lite0",
                   weights_path: Optional[str] = None) -> Tensor:
    """Features ``[V, C, h, w]`` of an all-black image in every view: the text-only floor's input."""
    from ifnet.models.visual import create_extractor

    net = create_extractor(extractor, pretrained=True, weights_path=weights_path, freeze=True).eval()
    img = np.zeros((cfg.image_size, cfg.image_size), dtype=np.uint8)
    x = ImageTransform(cfg, train=False).to_tensor(img)[None]
    with torch.no_grad():
        y = net.forward_features(x).to(torch.float16)
    return y.expand(views, *y.shape[1:]).contiguous()


# -- top tuning (ifnet.models.tuning): the pretrained trunk's bottom activations, once per image ---------

def compute_mid_shard(studies: Sequence[Study], image_root: Path, cfg: ImageConfig, out_path: Path,
                      extractor: str = "efficientnet_lite0") -> float:
    """Worker job: the pretrained trunk's *bottom* activations (``split()``: below the stride-32 stage) of
    every view of ``studies``, after the IEC of ``cfg.iec``, as float16 ``[V, C', h', w']`` per study in one
    safetensors file. Returns the seconds taken."""
    from safetensors.torch import save_file

    from ifnet.models.tuning import apply_per_study
    from ifnet.models.visual import create_extractor

    t0 = time.time()
    net = create_extractor(extractor, pretrained=True, freeze=True).eval()
    bottom, _ = net.split()
    bottom = bottom.to(memory_format=torch.channels_last)
    transform = ImageTransform(cfg, train=False)
    views = ((s.id, torch.stack([transform(read_xray(image_root / rel)) for rel in s.image_paths[: cfg.max_views]]))
             for s in studies)
    save_file(apply_per_study(bottom, views, batch_size=8, channels_last=True), str(out_path))
    return time.time() - t0
