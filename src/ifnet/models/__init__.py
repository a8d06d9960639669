"""IFNet model: visual extractors, memory matrix, the assembled model and its checkpoints.

Names are imported lazily so ``import ifnet.models.visual`` does not pull in the transformer, and
``import ifnet.models`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VisualExtractor": "visual", "create_extractor": "visual", "list_extractors": "visual",
    "register_extractor": "visual", "load_weights_file": "visual",
    "MemoryMatrix": "memory", "MemorySlots": "memory", "MemoryReadout": "memory",
    "IFNet": "ifnet", "IFNetConfig": "ifnet", "IFNetDecoder": "ifnet", "IFNetOutput": "ifnet",
    "EncoderOutput": "ifnet", "VisualTokens": "ifnet", "IFNetDecodeState": "ifnet", "compute_losses": "ifnet",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_training_state": "checkpoint",
    "read_meta": "checkpoint", "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ifnet.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ifnet.models.{module}"), name)
