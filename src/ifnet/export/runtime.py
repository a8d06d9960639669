"""Run an ``ifnet export`` folder with ONNX Runtime: encode, decode (greedy / beam), predict.

:class:`OnnxModel` holds one ONNX Runtime session per graph and mirrors the PyTorch model's stages
(``extract_features``, ``encode_features``, ``decode``). Decoding reuses :mod:`ifnet.decoding` unchanged:
:class:`OnnxDecoder` is a ``StepModel`` whose state keeps the graph's tensors as torch tensors (zero-copy views
of ONNX Runtime's numpy outputs), so beam search reorders them with ``index_select`` as it does PyTorch's.
:class:`OnnxPredictor` is :class:`ifnet.inference.Predictor` for an export folder: same preprocessing (from the
manifest), same :class:`~ifnet.inference.Prediction` with the same timing keys.

torch is used for the image transform and the search bookkeeping only; no model code runs in PyTorch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ifnet.errors import IFNetError
from ifnet.export.onnx_export import (EXPORT_FORMAT, EXPORT_VERSION, GRAPHS, LABEL_HEAD_FILE, MANIFEST_FILE,
                                      VOCAB_FILE, ExportError, file_sha256)
from ifnet.inference import Prediction, _StudyPipeline, guidance_weight, positive_count
from ifnet.io_utils import PathLike, read_json
from ifnet.labels import NUM_OBSERVATIONS

__all__ = ["read_manifest", "OnnxModel", "OnnxEncoderOutput", "OnnxDecodeState", "OnnxDecoder", "OnnxPredictor"]

ArrayLike = Union[Tensor, np.ndarray]


def read_manifest(folder: PathLike, *, check_files: bool = True) -> dict:
    """``manifest.json`` of an export folder, after checking format, version and (optionally) every file's sha256."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: ONNX export folder not found")
    try:
        manifest = read_json(root / MANIFEST_FILE)
    except IFNetError as e:
        raise ExportError(f"{root}: not an ifnet ONNX export ({MANIFEST_FILE}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{root / MANIFEST_FILE}: not an ifnet ONNX export manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise ExportError(f"{root}: export format version {version!r} is not supported by this ifnet "
                          f"(reads up to {EXPORT_VERSION}); upgrade ifnet")
    if check_files:
        for name, info in (manifest.get("files") or {}).items():
            path = root / name
            if Path(name).name != name:
                raise ExportError(f"{root / MANIFEST_FILE}: bad file name {name!r}")
            if not path.is_file():
                raise ExportError(f"{path}: missing (incomplete export)")
            if not isinstance(info, dict) or file_sha256(path) != info.get("sha256"):
                raise ExportError(f"{path}: sha256 checksum mismatch; the file is corrupt or was modified")
    return manifest


class OnnxEncoderOutput(NamedTuple):
    """What the decoder needs, as torch tensors: ``label_logits [B, 14]``, ``condition [B, 14]`` (used),
    ``memory [B, S, D]``, ``memory_mask [B, S]`` and the per-layer cross-attention state (manifest order)."""

    memory: Tensor
    memory_mask: Tensor
    label_logits: Tensor
    condition: Tensor
    cross: tuple[Tensor, ...]


@dataclass
class OnnxDecodeState:
    """Decoding state of :class:`OnnxDecoder`; ``index_select`` reorders rows (beam search)."""

    position: int  # index of the next token (bos is 0)
    condition: Tensor  # [B, 14]
    self_state: tuple[Tensor, ...]  # recurrent (S, z) per layer, or the (K, V) cache
    cross: tuple[Tensor, ...]  # cross-attention state per layer

    @property
    def batch_size(self) -> int:
        return self.condition.shape[0]

    def index_select(self, idx: Tensor) -> "OnnxDecodeState":
        return replace(self, condition=self.condition.index_select(0, idx),
                       self_state=tuple(t.index_select(0, idx) for t in self.self_state),
                       cross=tuple(t.index_select(0, idx) for t in self.cross))


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch's side of the work (image transform, search bookkeeping on [beams, vocab] tensors) on one
    thread. These ops are tiny, so a second thread gains nothing, and on a busy 2-core machine an OpenMP
    parallel region waits for a descheduled worker: a 10 us ``log_softmax`` was measured at 1-12 ms next to
    ONNX Runtime's threads (docs/DEPLOY.md). ONNX Runtime keeps its own ``threads``."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _numpy(x: ArrayLike) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr)


class OnnxModel:
    """An export folder loaded into ONNX Runtime sessions (CPU).

    ``variant``: ``"fp32"`` or ``"int8"`` (default: the manifest's ``default_variant``). ``threads``: intra-op
    threads per session (default: ONNX Runtime's choice, all cores).
    """

    def __init__(self, folder: PathLike, *, variant: Optional[str] = None, threads: Optional[int] = None,
                 check_files: bool = True) -> None:
        import onnxruntime as ort

        from ifnet.data.tokenizer import Tokenizer
        from ifnet.data.transforms import ImageConfig

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, check_files=check_files)
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant", "fp32")
        if self.variant not in variants:
            raise ExportError(f"{self.folder}: has no {self.variant!r} variant (has: {', '.join(variants)}); "
                              "re-export with --int8 for the int8 graphs")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # No busy-waiting between runs: the decode loop alternates short ONNX Runtime calls with torch
        # bookkeeping, and spinning ORT threads would take the cores from it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {g: ort.InferenceSession(str(self.folder / variants[self.variant][g]), options,
                                                 providers=["CPUExecutionProvider"]) for g in GRAPHS}
        self.tokenizer = Tokenizer.load(self.folder / VOCAB_FILE)
        pre = dict(self.manifest["preprocessing"])
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        self.image_config = ImageConfig(**pre)
        m = self.manifest["model"]
        self.attention: str = m["attention"]
        self.max_views: int = m["max_views"]
        self.max_positions: int = m["max_positions"]
        self.num_heads: int = m["num_heads"]
        self.head_dim: int = m["d_model"] // m["num_heads"]
        self.self_names: list[str] = self.manifest["state"]["self_attention"]
        self.cross_names: list[str] = self.manifest["state"]["cross_attention"]
        self.decoding: dict = self.manifest["decoding"]
        self._label_head: Optional[np.ndarray] = None

    # -- stages -----------------------------------------------------------------------------------
    def extract_features(self, images: ArrayLike, view_mask: ArrayLike) -> Tensor:
        """``images [B, V, 3, S, S]`` + ``view_mask [B, V]`` -> ``features [B, V, C, h, w]`` (zeros for
        missing views, which never reach the backbone)."""
        images = torch.as_tensor(images)
        view_mask = self._check_view_mask(view_mask, images.shape[:2])
        present = self.sessions["backbone"].run(None, {"images": _numpy(images[view_mask].float())})[0]
        present = torch.from_numpy(present)
        out = present.new_zeros((*images.shape[:2], *present.shape[1:]))
        out[view_mask] = present
        return out

    def encode_features(self, features: ArrayLike, view_mask: ArrayLike,
                        condition: Optional[ArrayLike] = None) -> OnnxEncoderOutput:
        """Backbone ``features [B, V, C, h, w]`` -> :class:`OnnxEncoderOutput`; ``condition [B, 14]`` are
        supplied findings (None: the label head's predictions, as ``IFNet.encode``)."""
        features = torch.as_tensor(features, dtype=torch.float32)
        b, v = features.shape[:2]
        view_mask = self._check_view_mask(view_mask, (b, v))
        if v < self.max_views:  # the graph was exported for max_views slots: pad with masked views
            features = torch.cat([features, features.new_zeros(b, self.max_views - v, *features.shape[2:])], 1)
            view_mask = torch.cat([view_mask, view_mask.new_zeros(b, self.max_views - v)], 1)
        if condition is None:
            cond, weight = np.zeros((b, NUM_OBSERVATIONS), np.float32), np.zeros(b, np.float32)
        else:
            cond = _numpy(torch.as_tensor(condition, dtype=torch.float32))
            if cond.shape != (b, NUM_OBSERVATIONS):
                raise ValueError(f"condition must be [B, {NUM_OBSERVATIONS}] = {(b, NUM_OBSERVATIONS)}, "
                                 f"got {cond.shape}")
            weight = np.ones(b, np.float32)
        out = self.sessions["encoder"].run(None, {"features": _numpy(features), "view_mask": _numpy(view_mask),
                                                  "condition": cond, "condition_weight": weight})
        label_logits, used, memory, memory_mask, *cross = (torch.from_numpy(o) for o in out)
        return OnnxEncoderOutput(memory, memory_mask, label_logits, used, tuple(cross))

    def encode(self, images: ArrayLike, view_mask: ArrayLike, condition: Optional[ArrayLike] = None
               ) -> OnnxEncoderOutput:
        """``images [B, V, 3, S, S]`` -> :class:`OnnxEncoderOutput` (backbone, then :meth:`encode_features`)."""
        return self.encode_features(self.extract_features(images, view_mask), view_mask, condition)

    def decode(self, enc: OnnxEncoderOutput, *, beam_size: Optional[int] = None, max_len: Optional[int] = None,
               **decoding_options: Any) -> Tensor:
        """Report token ids ``[B, L]`` (no bos; eos kept; pad after), exactly as ``IFNet.decode``: beam search,
        or greedy when ``beam_size=1``. Defaults: the manifest's (the checkpoint's eval settings)."""
        from ifnet.decoding.search import DecodingConfig
        from ifnet.decoding.search import generate as search

        beam_size = positive_count("beam_size", beam_size, self.decoding["beam_size"])
        max_len = positive_count("max_len", max_len, self.decoding["max_len"])
        if max_len > self.max_positions:
            raise IFNetError(f"max_len={max_len} exceeds the model's max_positions={self.max_positions}")
        decoding_options.setdefault("guidance", float(self.decoding.get("guidance", 0.0)))
        cfg = DecodingConfig(beam_size=beam_size, max_len=max_len, **decoding_options)
        with torch_single_thread(), torch.no_grad():
            return search(OnnxDecoder(self), enc, cfg, bos_id=self.decoding["bos_id"],
                          eos_id=self.decoding["eos_id"], pad_id=self.decoding["pad_id"])

    def generate(self, images: ArrayLike, view_mask: ArrayLike, *, condition: Optional[ArrayLike] = None,
                 beam_size: Optional[int] = None, max_len: Optional[int] = None, **decoding_options: Any) -> Tensor:
        """Images -> report token ids, as ``IFNet.generate``."""
        return self.decode(self.encode(images, view_mask, condition), beam_size=beam_size, max_len=max_len,
                           **decoding_options)

    def label_activation_maps(self, features: Tensor, view_mask: ArrayLike) -> Tensor:
        """Per-observation class activation maps ``[B, 14, V, h, w]``, as ``IFNet.label_activation_maps``."""
        if self._label_head is None:
            self._label_head = np.load(self.folder / LABEL_HEAD_FILE, allow_pickle=False)
        view_mask = torch.as_tensor(view_mask).bool()
        maps = torch.einsum("bvchw,lc->blvhw", features.float(), torch.from_numpy(self._label_head))
        return maps * view_mask[:, None, :, None, None].to(maps.dtype)

    # -- helpers ----------------------------------------------------------------------------------
    def empty_self_state(self, batch: int) -> tuple[Tensor, ...]:
        """The decoder's self-attention state before the first token (zeros; an empty cache for softmax)."""
        h, d = self.num_heads, self.head_dim
        per_layer = ((torch.zeros(batch, h, d, d), torch.zeros(batch, h, d)) if self.attention == "linear"
                     else (torch.zeros(batch, h, 0, d), torch.zeros(batch, h, 0, d)))
        return per_layer * (len(self.self_names) // 2)

    def _check_view_mask(self, view_mask: ArrayLike, shape: Sequence[int]) -> Tensor:
        b, v = int(shape[0]), int(shape[1])
        view_mask = torch.as_tensor(view_mask).bool()
        if tuple(view_mask.shape) != (b, v):
            raise ValueError(f"view_mask must be [B, V] = {(b, v)}, got {tuple(view_mask.shape)}")
        if v > self.max_views:
            raise ValueError(f"{v} views per study but the model was exported for max_views={self.max_views}")
        if not bool(view_mask.any(1).all()):
            raise IFNetError("every study needs at least one present view (view_mask has an all-False row)")
        return view_mask


class OnnxDecoder:
    """``StepModel`` (see :mod:`ifnet.decoding`) over ``decoder_step.onnx``. The graph already sets the pad
    and bos logits to -inf, as :class:`ifnet.models.ifnet.IFNetDecoder` does."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.session = model.sessions["decoder_step"]
        self.output_names = ["logits", *model.manifest["state"]["self_attention_outputs"]]

    def start(self, enc: OnnxEncoderOutput) -> OnnxDecodeState:
        batch = enc.condition.shape[0]
        return OnnxDecodeState(0, enc.condition, self.model.empty_self_state(batch), tuple(enc.cross))

    def step(self, tokens: Tensor, state: OnnxDecodeState) -> tuple[Tensor, OnnxDecodeState]:
        if state.position >= self.model.max_positions:
            raise IFNetError(f"sequence of {state.position + 1} tokens exceeds max_positions="
                             f"{self.model.max_positions}")
        feed = {"token": _numpy(tokens.long()), "position": np.asarray(state.position, dtype=np.int64),
                "condition": _numpy(state.condition)}
        feed.update(zip(self.model.self_names, map(_numpy, state.self_state)))
        feed.update(zip(self.model.cross_names, map(_numpy, state.cross)))
        logits, *new_state = self.session.run(self.output_names, feed)
        return torch.from_numpy(logits), replace(state, position=state.position + 1,
                                                 self_state=tuple(torch.from_numpy(t) for t in new_state))


class OnnxPredictor(_StudyPipeline):
    """:class:`ifnet.inference.Predictor` for an export folder: ``predict(views)`` -> the same ``Prediction``
    (report, findings, condition, timings per stage: enhance, preprocess, backbone, memory_encoder, decode)."""

    def __init__(self, folder: PathLike, *, variant: Optional[str] = None, beam_size: Optional[int] = None,
                 max_len: Optional[int] = None, guidance: Optional[float] = None,
                 threads: Optional[int] = None) -> None:
        from ifnet.data.transforms import ImageTransform

        self.model = OnnxModel(folder, variant=variant, threads=threads)
        self.engine, self.max_views = self.model, self.model.max_views
        self.tokenizer = self.model.tokenizer
        self.transform = ImageTransform(self.model.image_config, train=False)
        self.cleaner = (self.model.manifest.get("data_config") or {}).get("cleaner", "iu_xray")
        self.beam_size = positive_count("--beam-size", beam_size, self.model.decoding["beam_size"])
        self.max_len = positive_count("--max-len", max_len, self.model.decoding["max_len"])
        self.guidance = guidance_weight(guidance, self.model.decoding.get("guidance", 0.0))
        self.checkpoint = str(folder)

    @torch.no_grad()
    def predict(self, views: Sequence[np.ndarray], *, findings: Optional[np.ndarray] = None,
                heatmap: bool = False) -> Prediction:
        """``views``: frontal first, then lateral (optional), each [H, W] uint8/uint16."""
        with torch_single_thread():
            return self._predict(views, findings, heatmap)

    def _encode(self, features: Tensor, view_mask: Tensor, condition: Optional[np.ndarray]) -> OnnxEncoderOutput:
        return self.model.encode_features(features, view_mask, condition)

    def describe(self) -> dict:
        return {"runtime": f"onnxruntime-{self.model.variant}", "extractor": self.model.manifest["model"]["extractor"],
                "max_views": self.max_views, "image_size": self.model.image_config.image_size,
                "iec": self.model.image_config.iec, "beam_size": self.beam_size, "max_len": self.max_len,
                "guidance": self.guidance, "mbr_samples": 0, "device": "cpu"}
