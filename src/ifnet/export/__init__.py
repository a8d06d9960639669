"""Deployment: ONNX export of a checkpoint, int8 quantization, and an ONNX Runtime runner.

``export_checkpoint(ckpt, out, int8=...)`` writes a self-describing folder (``ifnet export``);
``OnnxPredictor(out).predict(views)`` generates a report from it as ``ifnet.inference.Predictor`` does from
the checkpoint. See docs/DEPLOY.md. Submodules are imported on first use, so ``import ifnet.export`` needs
neither onnx nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_checkpoint": "ifnet.export.onnx_export",
    "ExportError": "ifnet.export.onnx_export",
    "read_manifest": "ifnet.export.runtime",
    "OnnxModel": "ifnet.export.runtime",
    "OnnxDecoder": "ifnet.export.runtime",
    "OnnxPredictor": "ifnet.export.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ifnet.export' has no attribute {name!r}")
