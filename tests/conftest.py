"""Shared test fixtures. Data in ../shared is read in place, never copied into the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("IFNET_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder (CI lays it beside the clone). Missing it is a failure, not a skip."""
    assert SHARED_DIR.is_dir(), f"../shared not found at {SHARED_DIR}; set IFNET_SHARED"
    return SHARED_DIR


@pytest.fixture(scope="session")
def iu_annotation_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "iu_xray" / "annotation.json"


@pytest.fixture(scope="session")
def iu_synth_images(shared_dir: Path) -> Path:
    """Synthetic stand-in images for the 590 IU-Xray test studies (R2Gen layout <id>/0.png, 1.png)."""
    return shared_dir / "data" / "iu_xray_synth" / "images"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One epoch of a tiny IFNet on phantoms (~20 s), trained once per session and shared
    (same folder as the serve tests use, so the suite trains it once)."""
    from ifnet.serve.tiny_checkpoint import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "serve-tiny-checkpoint")
