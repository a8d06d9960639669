"""Helpers shared by the reliability tests (tests/test_reliability_*.py) and benchmarks/bench_fuzz.py.

No tests here. The tiny CNN extractor keeps checkpoints at a few hundred kB and an epoch well under a
second; it is put in the extractor registry only for as long as a test needs it (:func:`tiny_cnn`), so
registry-parametrized tests elsewhere never see it.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ifnet.models import visual

TINY_CNN = "reliability_tiny_cnn"

#: A tiny training config (dotted overrides); add data.annotation / data.image_root.
TINY_TRAIN = [
    f"model.extractor={TINY_CNN}", "model.num_memory_slots=8", "model.memory_top_k=2", "model.memory_heads=2",
    "model.transformer={d_model: 16, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, d_ff: 32}",
    "data.image_size=64", "data.num_workers=0", "data.batch_size=4", "data.iec=none",
    "eval.beam_size=1", "eval.max_len=8", "eval.meteor=false", "deterministic=true", "device=cpu",
]


class TinyCNN(visual.VisualExtractor):
    """Two strided convolutions: 64 px -> 4 x 4 patches of 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4))
        self.out_channels = 16

    def forward_features(self, x):
        return self.net(x)


@contextlib.contextmanager
def tiny_cnn() -> Iterator[str]:
    """Register the tiny CNN under :data:`TINY_CNN` for the duration of the block."""
    added = TINY_CNN not in visual._EXTRACTORS
    if added:
        visual._EXTRACTORS[TINY_CNN] = lambda pretrained, weights_path: TinyCNN()
    try:
        yield TINY_CNN
    finally:
        if added:
            visual._EXTRACTORS.pop(TINY_CNN, None)


def quick_curves(rows, out_png, *, title: str = "") -> None:
    """Stand-in for ``ifnet.train.logs.plot_curves`` (matplotlib takes about a second per epoch on two busy
    cores): the same rows, written atomically at the same moment, as JSON."""
    import json

    from ifnet.io_utils import atomic_write_text

    atomic_write_text(out_png, json.dumps([dict(r) for r in rows], default=float))


@contextlib.contextmanager
def fast_training_logs() -> Iterator[None]:
    """Use :func:`quick_curves` in the trainer for the duration of the block."""
    from ifnet.train import trainer

    real = trainer.plot_curves
    trainer.plot_curves = quick_curves
    try:
        yield
    finally:
        trainer.plot_curves = real


def one_cpu_thread() -> Iterator[None]:
    """Generator for a fixture: torch on one thread (tiny models run several times faster on a busy
    two-core machine, and runs compare bit for bit), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_args(data: dict, *extra: str) -> list[str]:
    """Overrides for :func:`ifnet.config.resolve` (tiny model on the phantom data ``data``)."""
    return TINY_TRAIN + [f"data.annotation={data['annotation']}", f"data.image_root={data['image_root']}", *extra]


def cli_train_args(data: dict, out: Path, *extra_sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``ifnet train`` argv for the tiny config."""
    return ["train", "--out", str(out), *flags, *[a for s in train_args(data, *extra_sets) for a in ("--set", s)]]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def temp_leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (``.name.xxxxxxxx.tmp`` / ``.old``) our atomic writers leave on failure."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


def tiny_ifnet(extractor: str = TINY_CNN, reports: tuple[str, ...] = ("the heart is normal", "no effusion")):
    """(model, config, tokenizer): an untrained tiny IFNet (register the extractor first, see tiny_cnn)."""
    from ifnet.data.tokenizer import Tokenizer
    from ifnet.layers.saformer import SAFormerConfig
    from ifnet.models.ifnet import IFNet, IFNetConfig

    tok = Tokenizer.build(list(reports), threshold=1)
    config = IFNetConfig(vocab_size=len(tok), extractor=extractor, num_memory_slots=8, memory_top_k=2, memory_heads=2,
                         transformer=SAFormerConfig(d_model=16, num_heads=2, num_encoder_layers=1,
                                                    num_decoder_layers=1, d_ff=32))
    return IFNet(config), config, tok
