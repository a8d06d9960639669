"""A tiny trained checkpoint for trying, testing and load-testing the server without a download.

One epoch of a very small IFNet (ResNet-18 extractor, d_model 32) on a dozen generated phantom studies:
about 20 s on two CPU cores. Its reports are not meant to be good; its shapes, files and code paths
are those of a real checkpoint, so everything that serves a checkpoint can be exercised with it.
"""

from __future__ import annotations

from pathlib import Path

TINY_OVERRIDES = (
    "model.extractor=resnet18",
    "model.pretrained=false",
    "model.num_memory_slots=16",
    "model.memory_top_k=4",
    "model.memory_heads=2",
    "model.transformer={d_model: 32, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, d_ff: 64}",
    "data.image_size=64",
    "data.iec=clahe",
    "data.num_workers=0",
    "data.batch_size=8",
    "optim.epochs=1",
    "eval.beam_size=1",
    "eval.max_len=20",
    "eval.meteor=false",
)


def train_tiny_checkpoint(root: Path, *, seed: int = 0) -> Path:
    """Train into ``root`` (phantom data in ``root/data``, run in ``root/run``); return the checkpoint folder.

    Reuses a finished checkpoint already in ``root``, so several test modules of one session can share it.
    """
    from ifnet.config import resolve
    from ifnet.demo.dataset import DemoSplit, write_demo_dataset
    from ifnet.train.config import TrainConfig
    from ifnet.train.trainer import Trainer

    root = Path(root)
    best = root / "run" / "best"
    if (best / "meta.json").is_file():
        return best
    info = write_demo_dataset(root / "data", DemoSplit(12, 4, 4), seed=seed, size=128)
    overrides = [f"data.annotation={info['annotation']}", f"data.image_root={info['image_root']}",
                 f"seed={seed}", *TINY_OVERRIDES]
    Trainer(resolve(TrainConfig, None, overrides), root / "run").fit()
    return best
