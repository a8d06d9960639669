"""Seeds in one place, and the provenance recorded with every run (versions, git revision, host)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGES = ("ifnet", "torch", "torchvision", "timm", "numpy", "opencv-python-headless", "pycocoevalcap",
             "safetensors")


def seed_everything(seed: int, rank: int = 0, *, deterministic: bool = False) -> int:
    """Seed python, numpy and torch with ``seed + rank`` (each DDP rank draws different augmentations).

    ``deterministic`` asks torch for deterministic kernels (CPU runs are then bit-reproducible).
    Returns the effective seed.
    """
    import torch

    effective = int(seed) + int(rank)
    random.seed(effective)
    np.random.seed(effective % (2**32))
    torch.manual_seed(effective)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return effective


def git_revision(path: Path | None = None) -> str | None:
    """The repository's HEAD (with '-dirty' when there are local changes), or None outside git."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_provenance(seed: int) -> dict[str, Any]:
    import torch

    return {
        "seed": seed,
        "versions": library_versions(),
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "argv": sys.argv,
    }
