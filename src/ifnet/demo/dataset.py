"""Write the embedded phantom sample to disk in R2Gen layout, so every tool reads it like real data."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ifnet.demo.phantom import make_study
from ifnet.io_utils import atomic_write_bytes, atomic_write_json
from ifnet.labels import OBSERVATIONS


@dataclass(frozen=True)
class DemoSplit:
    """Number of studies per split (R2Gen's 7:1:2 proportions by default)."""

    train: int = 140
    val: int = 20
    test: int = 40


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_demo_dataset(root: Path, split: DemoSplit = DemoSplit(), *, seed: int = 0, size: int = 256) -> dict:
    """Create ``root/images/<id>/{0,1}.png``, ``root/annotation.json`` and ``root/labels.json``.

    ``labels.json`` holds the train and val labels only (as the shared IU-Xray labels do): the test
    labels are kept back, as in a real evaluation. Returns a summary dict (counts, paths, low-quality ids).
    Deterministic in ``seed``; a re-run rewrites identical bytes.
    """
    root = Path(root)
    annotation: dict[str, list] = {}
    labels: dict[str, list[int]] = {}
    low_quality: list[str] = []
    for name, count in (("train", split.train), ("val", split.val), ("test", split.test)):
        entries = []
        for i in range(count):
            study_id = f"PH{name[:2].upper()}{i:04d}"
            study = make_study(study_id, seed=seed, size=size)
            for view, img in enumerate((study.frontal, study.lateral)):
                atomic_write_bytes(root / "images" / study_id / f"{view}.png", _png_bytes(img))
            entries.append({"id": study_id, "report": study.report,
                            "image_path": [f"{study_id}/0.png", f"{study_id}/1.png"], "split": name})
            if name != "test":
                labels[study_id] = [int(v) for v in study.labels]
            if study.low_quality:
                low_quality.append(study_id)
        annotation[name] = entries
    atomic_write_json(root / "annotation.json", annotation, indent=None)
    atomic_write_json(root / "labels.json", {
        "_note": "ifnet demo phantom labels (train+val; test withheld). 1 = positive.",
        "columns": list(OBSERVATIONS), "labels": labels}, indent=None)
    return {"root": str(root), "image_root": str(root / "images"),
            "annotation": str(root / "annotation.json"), "labels": str(root / "labels.json"),
            "counts": {"train": split.train, "val": split.val, "test": split.test},
            "low_quality": low_quality}
