"""``ifnet export``: a checkpoint -> a self-describing folder of ONNX graphs for ONNX Runtime.

The folder::

    backbone.onnx          images [N, 3, S, S] (present views) -> features [N, C, h, w]
    encoder.onnx           features [B, V, C, h, w], view_mask [B, V], condition [B, 14], condition_weight [B]
                           -> label_logits, condition_used, memory, memory_mask, cross-attention state per layer
    decoder_step.onnx      token [B], position [], condition [B, 14], self-/cross-attention state
                           -> logits [B, vocab] (pad, bos at -inf), new self-attention state
    *.int8.onnx            (with int8=True) encoder and decoder step with dynamically quantized int8 weights
                           (the int8 variant keeps the fp32 backbone: see ifnet.export.quantize)
    vocab.json             the checkpoint's vocabulary
    label_head.npy         the label head's weights [14, C], for class-activation heatmaps
    manifest.json          format + version, every graph's inputs/outputs, opset, preprocessing (the training
                           DataConfig's image settings), decoding defaults, the source checkpoint's sha256,
                           the export-time check of ONNX Runtime against PyTorch, and every file's sha256

:class:`ifnet.export.runtime.OnnxModel` reads it back with nothing else: the graphs, how to preprocess an
image and how to decode. Writing is atomic (a temporary sibling folder renamed into place at the end).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifnet.data.tokenizer import BOS_ID, NEVER_GENERATED
from ifnet.errors import IFNetError
from ifnet.io_utils import OutputExistsError, PathLike, atomic_write_json, read_json, share_like_user_files
from ifnet.export.graphs import BackboneGraph, DecoderStepGraph, EncoderGraph, state_names
from ifnet.models.checkpoint import replace_dir

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "DEFAULT_OPSET", "GRAPHS", "ExportError", "export_checkpoint",
           "file_sha256"]

EXPORT_FORMAT = "ifnet-onnx"
EXPORT_VERSION = 1
#: Opset 17 has every operator these graphs need (TopK, ScatterElements, LayerNormalization) and runs on
#: ONNX Runtime >= 1.12; nothing newer is needed.
DEFAULT_OPSET = 17
#: opsets these graphs export and verify with (checked 2026-12-04 with the demo checkpoint: 9 lacks the Pad the
#: CNN needs; 20 is the highest the TorchScript exporter writes)
OPSET_RANGE = (11, 20)
GRAPHS = ("backbone", "encoder", "decoder_step")
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.json"
LABEL_HEAD_FILE = "label_head.npy"


class ExportError(IFNetError):
    """A checkpoint that cannot be exported, or an export folder that cannot be read."""


def export_checkpoint(checkpoint: PathLike, out: PathLike, *, int8: bool = False, overwrite: bool = False,
                      opset: int = DEFAULT_OPSET) -> dict:
    """Export ``checkpoint`` to the folder ``out`` (see the module docstring); returns the manifest.

    Raises :class:`~ifnet.models.checkpoint.CheckpointError` for a missing or corrupt checkpoint and
    :class:`~ifnet.io_utils.OutputExistsError` when ``out`` exists and ``overwrite`` is False.
    """
    from ifnet.evaluation import _training_data_config
    from ifnet.models.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint
    from ifnet.train.data import image_config

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise IFNetError(f"--opset {opset}: these graphs export with opsets {OPSET_RANGE[0]}-{OPSET_RANGE[1]} "
                         f"(default {DEFAULT_OPSET})")
    target = Path(out)
    _check_target(target, overwrite)
    model, tokenizer, config, meta = load_checkpoint(checkpoint, map_location="cpu")
    data_config = _training_data_config(meta, Path(checkpoint))
    images_cfg = image_config(data_config)
    model.eval()
    kind = config.transformer.attention
    num_layers = config.transformer.num_decoder_layers
    self_names, cross_names = state_names(kind, num_layers)
    train_eval = (meta.get("metadata") or {}).get("train_config", {}).get("eval", {})

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        example = _example_inputs(model, images_cfg.image_size, config.max_views)
        with torch.no_grad(), _quiet_export():
            traced = _export_graphs(model, example, tmp, opset, self_names, cross_names)
        variants = {"fp32": {g: f"{g}.onnx" for g in GRAPHS}}
        if int8:
            from ifnet.export.quantize import INT8_OP_TYPES, quantize_export

            variants["int8"] = quantize_export(tmp, variants["fp32"])
        verification = {name: _verify(tmp, files, traced) for name, files in variants.items()}
        tokenizer.save(tmp / VOCAB_FILE)
        np.save(tmp / LABEL_HEAD_FILE, model.label_head.classifier.weight.detach().float().numpy(),
                allow_pickle=False)
        src = Path(checkpoint)
        src_dir = src.parent if src.is_file() else src
        grid = traced["grid"]
        manifest = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "opset": opset,
            "source_checkpoint": {
                "path": str(src_dir),
                "weights_sha256": meta["files"][WEIGHTS_FILE]["sha256"],
                "meta_sha256": file_sha256(src_dir / META_FILE),
                "epoch": (meta.get("metadata") or {}).get("epoch"),
            },
            "model": {
                "extractor": config.extractor, "attention": kind, "d_model": config.d_model,
                "num_heads": config.transformer.num_heads, "num_decoder_layers": num_layers,
                "vocab_size": config.vocab_size, "max_views": config.max_views,
                "max_positions": config.max_positions, "feature_channels": int(model.extractor.out_channels),
                "feature_grid": list(grid[1:]), "memory_tokens": int(grid[0] * grid[1] * grid[2]),
            },
            "preprocessing": _to_plain(images_cfg),
            "data_config": _to_plain(data_config),
            "decoding": {
                "beam_size": int(train_eval.get("beam_size", 3)), "max_len": int(train_eval.get("max_len", 60)),
                "guidance": float(train_eval.get("guidance", 0.0)),
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                "masked_logits": list(NEVER_GENERATED),
            },
            "state": {"self_attention": self_names, "cross_attention": cross_names,
                      "self_attention_outputs": ["new_" + n for n in self_names]},
            "graphs": {g: _describe(tmp / f"{g}.onnx") for g in GRAPHS},
            "variants": variants,
            "default_variant": "int8" if int8 else "fp32",
            "int8": None if not int8 else {
                "method": "onnxruntime.quantization.quantize_dynamic: int8 weights, activations quantized at "
                          "run time, no calibration",
                "quantized_op_types": {g: ops for g, ops in INT8_OP_TYPES.items() if ops},
            },
            "verification": verification,
            "libraries": _library_versions(),
        }
        manifest["files"] = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        share_like_user_files(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# -- graphs --------------------------------------------------------------------------------------

def _example_inputs(model, image_size: int, max_views: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, image_size, image_size, generator=g)
    view_mask = torch.ones(1, max_views, dtype=torch.bool)
    return {"images": images, "view_mask": view_mask}


def _export_graphs(model, example: dict, folder: Path, opset: int, self_names: list[str],
                   cross_names: list[str]) -> dict:
    """Export the three graphs; returns the PyTorch reference values of the example for :func:`_verify`."""
    batch = {0: "batch"}
    images = example["images"]
    view_mask = example["view_mask"]
    max_views = view_mask.shape[1]
    # Backbone: any number of present views.
    torch.onnx.export(BackboneGraph(model).eval(), (images,), str(folder / "backbone.onnx"), dynamo=False,
                      input_names=["images"], output_names=["features"], opset_version=opset,
                      dynamic_axes={"images": {0: "views"}, "features": {0: "views"}})
    per_view = model.extractor.forward_features(images)
    reps = -(-max_views // images.shape[0])
    features = per_view.repeat(reps, 1, 1, 1)[:max_views][None]  # [1, V, C, h, w]
    condition = torch.zeros(1, 14)
    weight = torch.zeros(1)
    enc_outputs = ["label_logits", "condition_used", "memory", "memory_mask", *cross_names]
    torch.onnx.export(EncoderGraph(model).eval(), (features, view_mask, condition, weight),
                      str(folder / "encoder.onnx"), dynamo=False,
                      input_names=["features", "view_mask", "condition", "condition_weight"],
                      output_names=enc_outputs, opset_version=opset,
                      dynamic_axes={n: batch for n in ["features", "view_mask", "condition", "condition_weight",
                                                        *enc_outputs]})
    enc = model.encode(None, view_mask, features=features)
    state = model.start_decoding(enc)
    cross_state = [t for entry in state.decoder.cross_attention for t in entry]
    # Export at batch 2 and position 1 with a non-empty state, so no size of 1 or 0 gets baked in.
    idx = torch.tensor([0, 0])
    state = state.index_select(idx)
    tokens = torch.tensor([BOS_ID, BOS_ID])
    _, state = model.decode_step(tokens, state)
    step_state = ([t for entry in state.decoder.self_attention for t in entry]
                  + [t for entry in state.decoder.cross_attention for t in entry])
    step_tokens = torch.tensor([4 % model.config.vocab_size, 5 % model.config.vocab_size])
    position = torch.tensor(1, dtype=torch.long)
    new_names = ["new_" + n for n in self_names]
    step_dynamic = {n: {0: "batch"} for n in ["token", "condition", "logits", *self_names, *cross_names, *new_names]}
    if model.config.transformer.attention == "softmax":  # the key/value cache grows by one per step
        for n in self_names:
            step_dynamic[n][2] = "length"
            step_dynamic["new_" + n][2] = "length_plus_1"
    torch.onnx.export(DecoderStepGraph(model).eval(), (step_tokens, position, state.condition, *step_state),
                      str(folder / "decoder_step.onnx"), dynamo=False,
                      input_names=["token", "position", "condition", *self_names, *cross_names],
                      output_names=["logits", *new_names], opset_version=opset, dynamic_axes=step_dynamic)
    from ifnet.models.ifnet import IFNetDecoder

    step_logits, _ = IFNetDecoder(model).step(step_tokens, state)
    return {
        "images": images, "features": per_view, "encoder_inputs": (features, view_mask, condition, weight),
        "label_logits": enc.label_logits, "memory": enc.memory, "cross": cross_state,
        "step_inputs": (step_tokens, position, state.condition, *step_state), "step_logits": step_logits,
        "grid": enc.grid,
    }


def _verify(folder: Path, files: dict[str, str], ref: dict) -> dict:
    """Max |ONNX Runtime - PyTorch| on the export's own example inputs, per graph output that matters."""
    import onnxruntime as ort

    def session(graph: str):
        return ort.InferenceSession(str(folder / files[graph]), providers=["CPUExecutionProvider"])

    features = session("backbone").run(None, {"images": ref["images"].numpy()})[0]
    features_in, view_mask, condition, weight = ref["encoder_inputs"]
    enc = session("encoder").run(None, {"features": features_in.numpy(), "view_mask": view_mask.numpy(),
                                        "condition": condition.numpy(), "condition_weight": weight.numpy()})
    step_sess = session("decoder_step")
    names = [i.name for i in step_sess.get_inputs()]
    logits = step_sess.run(["logits"], {n: (t.numpy() if t.dim() else np.asarray(t.item()))
                                        for n, t in zip(names, ref["step_inputs"])})[0]
    want = ref["step_logits"].numpy()
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(logits)):
        raise ExportError(f"{files['decoder_step']}: masked logits differ from PyTorch's")
    return {
        "features_max_abs_diff": float(np.abs(features - ref["features"].numpy()).max()),
        "label_logits_max_abs_diff": float(np.abs(enc[0] - ref["label_logits"].numpy()).max()),
        "memory_max_abs_diff": float(np.abs(enc[2] - ref["memory"].numpy()).max()),
        "step_logits_max_abs_diff": float(np.abs(logits[finite] - want[finite]).max()),
    }


def _describe(path: Path) -> dict:
    """Inputs and outputs of a graph as ONNX Runtime sees them: name, dtype, shape (symbolic names kept)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def rows(items):
        return [{"name": i.name, "dtype": i.type.replace("tensor(", "").rstrip(")"), "shape": list(i.shape)}
                for i in items]

    return {"file": path.name, "inputs": rows(sess.get_inputs()), "outputs": rows(sess.get_outputs())}


@contextlib.contextmanager
def _quiet_export():
    """The TorchScript tracer warns about Python-side shape checks (``_check_view_mask``): they hold for
    every input the runner feeds (its shapes are fixed by the manifest), so the warnings are noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


# -- files ---------------------------------------------------------------------------------------

def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"{target}: exists and is not a folder")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(f"{target}: already exists; pass --overwrite to replace it")
    if not (target / MANIFEST_FILE).is_file():
        raise OutputExistsError(f"{target}: exists and is not an ifnet ONNX export (no {MANIFEST_FILE}); "
                                "refusing to replace it")
    try:
        manifest = read_json(target / MANIFEST_FILE)
    except IFNetError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise OutputExistsError(f"{target}: exists and is not an ifnet ONNX export; refusing to replace it")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_plain(obj: Any) -> Any:
    from ifnet.config import to_dict

    return to_dict(obj)


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("ifnet", "torch", "onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions
