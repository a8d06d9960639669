"""Report generation for new studies: the library behind `ifnet generate` and `ifnet serve`.

A :class:`Predictor` loads a checkpoint once and turns decoded views ([H, W] arrays from
:func:`ifnet.data.images.read_xray`) into a report, predicted findings with probabilities, timings
per stage, and optionally a heatmap. Preprocessing (size, IEC) is the checkpoint's training config.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ifnet.decoding.guidance import valid_weight
from ifnet.errors import IFNetError
from ifnet.labels import NUM_OBSERVATIONS, OBSERVATIONS
from ifnet.metrics.consistency import check_reports


@dataclass
class Prediction:
    report: str
    findings: dict[str, float]  # observation -> probability (from the label head)
    condition: dict[str, float]  # the label vector the memory was conditioned on
    conditioned_on: str  # "predicted" or "supplied"
    timings_ms: dict[str, float] = field(default_factory=dict)
    heatmap: Optional[np.ndarray] = None  # [H, W] in 0..1 over the frontal view, when asked
    heatmap_label: Optional[str] = None
    # what the report says against its condition (ifnet.metrics.consistency): said / unsupported / unsaid
    consistency: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"report": self.report, "findings": self.findings, "condition": self.condition,
                "conditioned_on": self.conditioned_on, "consistency": self.consistency,
                "timings_ms": self.timings_ms, "heatmap_label": self.heatmap_label}


def parse_findings(text: str) -> np.ndarray:
    """``"Cardiomegaly, Pleural Effusion"`` -> 0/1 vector [14]; names are case-insensitive."""
    lookup = {name.lower(): i for i, name in enumerate(OBSERVATIONS)}
    vec = np.zeros(NUM_OBSERVATIONS, dtype=np.float32)
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in lookup:
            raise IFNetError(f"--findings: unknown observation {raw.strip()!r}; choose from: {', '.join(OBSERVATIONS)}")
        vec[lookup[name]] = 1.0
    if vec[:-1].sum() == 0:
        vec[-1] = 1.0  # nothing supplied but "normal": No Finding
    return vec


def guidance_weight(value: Optional[float], default: float) -> float:
    """The condition guidance weight to decode with: ``value`` if given, else the model's ``default``."""
    weight = float(default if value is None else value)
    if not valid_weight(weight):
        raise IFNetError(f"--guidance must be a finite number >= 0, got {value}")
    return weight


def mbr_sample_count(value: Optional[int], default: int) -> int:
    """The number of MBR samples to decode with: ``value`` if given, else the model's ``default`` (0: off)."""
    count = int(default if value is None else value)
    if count < 0:
        raise IFNetError(f"--mbr-samples must be >= 0 (0: off), got {count}")
    return count


def positive_count(flag: str, value: Optional[int], default: int) -> int:
    """A decoding count that must be >= 1 (``--beam-size``, ``--max-len``, ``--limit``): ``value`` if given,
    else ``default``. 0 is refused, not read as "the default"."""
    count = int(default if value is None else value)
    if count < 1:
        raise IFNetError(f"{flag} must be >= 1, got {count}")
    return count


class _StudyPipeline:
    """The per-study pipeline shared by :class:`Predictor` (PyTorch) and
    :class:`ifnet.export.runtime.OnnxPredictor` (ONNX Runtime): enhance -> preprocess -> backbone ->
    memory + encoder -> decode, timed per stage, plus the optional heatmap.

    A subclass sets ``engine`` (an object with ``extract_features``, ``decode`` and
    ``label_activation_maps`` like :class:`ifnet.models.ifnet.IFNet`), ``tokenizer``, ``transform``,
    ``beam_size``, ``max_len``, ``guidance``, ``max_views`` and ``device``, and implements :meth:`_encode`.
    """

    engine: object
    device: torch.device = torch.device("cpu")
    max_views: int = 2
    cleaner: Optional[str] = "iu_xray"  # the training data's report cleaner, for labelling the generated text
    mbr_samples: int = 0  # findings-preserving MBR decoding over this many samples (0: the beam's best report)

    def _encode(self, features: torch.Tensor, view_mask: torch.Tensor, condition: Optional[np.ndarray]):
        raise NotImplementedError

    def describe(self) -> dict:
        """What the server shows of the loaded model: runtime, extractor, views, input size, IEC, decoding."""
        raise NotImplementedError

    def _predict(self, views: Sequence[np.ndarray], findings: Optional[np.ndarray], heatmap: bool) -> Prediction:
        if not views:
            raise IFNetError("at least one view (the frontal image) is needed")
        views = list(views)[: self.max_views]
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        enhanced = [self.transform.enhance(v) for v in views]
        t["enhance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = torch.stack([self.transform.to_tensor(e) for e in enhanced])[None].to(self.device)
        view_mask = torch.ones(1, len(views), dtype=torch.bool, device=self.device)
        t["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        features = self.engine.extract_features(images, view_mask)
        t["backbone"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        condition = None if findings is None else np.asarray(findings, dtype=np.float32)[None]
        enc = self._encode(features, view_mask, condition)
        t["memory_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from ifnet.evaluation import mbr_options

        tokens = self.engine.decode(enc, beam_size=self.beam_size, max_len=self.max_len, guidance=self.guidance,
                                    **mbr_options(self.mbr_samples, self.tokenizer, self.cleaner))
        t["decode"] = time.perf_counter() - t0
        probs = torch.sigmoid(enc.label_logits[0]).float().cpu().numpy()
        report = self.tokenizer.decode(tokens[0].tolist())
        cond = enc.condition[0].float().cpu().numpy()
        t0 = time.perf_counter()
        checked, _ = check_reports(cond[None], [report], cleaner=self.cleaner)
        t["consistency"] = time.perf_counter() - t0
        pred = Prediction(
            report=report,
            findings={n: round(float(p), 4) for n, p in zip(OBSERVATIONS, probs)},
            condition={n: round(float(c), 4) for n, c in zip(OBSERVATIONS, cond)},
            conditioned_on="predicted" if findings is None else "supplied",
            consistency=checked[0].to_json(),
        )
        if heatmap:
            t0 = time.perf_counter()
            pred.heatmap, pred.heatmap_label = self._heatmap(features, view_mask, probs, views[0].shape)
            t["heatmap"] = time.perf_counter() - t0
        pred.timings_ms = {k: round(v * 1000, 2) for k, v in t.items()}
        pred.timings_ms["total"] = round(sum(t.values()) * 1000, 2)
        return pred

    def _heatmap(self, features: torch.Tensor, view_mask: torch.Tensor, probs: np.ndarray,
                 shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
        """Class activation map of the most probable finding (No Finding excluded) on the frontal view."""
        maps = self.engine.label_activation_maps(features, view_mask)[0]  # [14, V, h, w]
        label = int(np.argmax(probs[:-1]))
        cam = maps[label, 0].float()
        cam = torch.relu(cam - cam.mean())
        cam = cam / cam.max().clamp(min=1e-8)
        up = torch.nn.functional.interpolate(cam[None, None], size=tuple(shape[:2]), mode="bilinear",
                                             align_corners=False)[0, 0]
        return up.cpu().numpy(), OBSERVATIONS[label]


class Predictor(_StudyPipeline):
    def __init__(self, checkpoint: Path | str, *, device: str = "auto", beam_size: Optional[int] = None,
                 max_len: Optional[int] = None, guidance: Optional[float] = None,
                 mbr_samples: Optional[int] = None) -> None:
        from ifnet.evaluation import _training_data_config
        from ifnet.models.checkpoint import load_checkpoint
        from ifnet.train.data import image_config
        from ifnet.train.trainer import resolve_device
        from ifnet.data.transforms import ImageTransform

        self.device = resolve_device(device)
        self.model, self.tokenizer, self.config, meta = load_checkpoint(checkpoint, map_location=self.device)
        self.engine, self.max_views = self.model, self.config.max_views
        self.data_config = _training_data_config(meta, Path(checkpoint))
        self.cleaner = self.data_config.cleaner
        self.transform = ImageTransform(image_config(self.data_config), train=False)
        train_eval = (meta.get("metadata") or {}).get("train_config", {}).get("eval", {})
        self.beam_size = positive_count("--beam-size", beam_size, int(train_eval.get("beam_size", 3)))
        self.max_len = positive_count("--max-len", max_len, int(train_eval.get("max_len", 60)))
        self.guidance = guidance_weight(guidance, train_eval.get("guidance", 0.0))
        self.mbr_samples = mbr_sample_count(mbr_samples, train_eval.get("mbr_samples", 0))
        self.checkpoint = str(checkpoint)

    @torch.no_grad()
    def predict(self, views: Sequence[np.ndarray], *, findings: Optional[np.ndarray] = None,
                heatmap: bool = False) -> Prediction:
        """``views``: frontal first, then lateral (optional), each [H, W] uint8/uint16."""
        return self._predict(views, findings, heatmap)

    def _encode(self, features: torch.Tensor, view_mask: torch.Tensor, condition: Optional[np.ndarray]):
        cond = None if condition is None else torch.as_tensor(condition, device=self.device)
        return self.model.encode(None, view_mask, cond, features=features)

    def describe(self) -> dict:
        return {"runtime": "pytorch", "extractor": self.config.extractor, "max_views": self.max_views,
                "image_size": self.data_config.image_size, "iec": self.data_config.iec, "beam_size": self.beam_size,
                "max_len": self.max_len, "guidance": self.guidance, "mbr_samples": self.mbr_samples,
                "device": str(self.device)}


def is_onnx_export(path: Path | str) -> bool:
    """True for a folder written by ``ifnet export`` (it holds the export manifest; checkpoints do not)."""
    from ifnet.export.onnx_export import MANIFEST_FILE

    return (Path(path) / MANIFEST_FILE).is_file()


def open_predictor(path: Path | str, *, device: str = "auto", beam_size: Optional[int] = None,
                   max_len: Optional[int] = None, guidance: Optional[float] = None,
                   threads: Optional[int] = None, mbr_samples: Optional[int] = None,
                   variant: Optional[str] = None) -> _StudyPipeline:
    """A :class:`Predictor` for a checkpoint folder, or an ONNX Runtime
    :class:`~ifnet.export.runtime.OnnxPredictor` for an ``ifnet export`` folder (``variant`` "fp32" or "int8",
    default the folder's default; on the CPU with ``threads`` intra-op threads)."""
    onnx = is_onnx_export(path)
    if variant is not None and not onnx:
        raise IFNetError(f"{path}: --variant chooses between an export folder's fp32 and int8 models; this is a "
                         "checkpoint")
    if onnx:
        if device not in ("auto", "cpu"):
            raise IFNetError(f"{path}: an ONNX export runs on the CPU (ONNX Runtime); got --device {device}")
        if mbr_samples:
            raise IFNetError(f"{path}: an ONNX export decodes with beam search only; --mbr-samples needs a checkpoint")
        from ifnet.export.runtime import OnnxPredictor

        return OnnxPredictor(path, variant=variant, beam_size=beam_size, max_len=max_len, guidance=guidance,
                             threads=threads)
    return Predictor(path, device=device, beam_size=beam_size, max_len=max_len, guidance=guidance,
                     mbr_samples=mbr_samples)


#: a view this far from square (long side / short side) is unlikely to be a chest radiograph
MAX_ASPECT = 3.0


def view_warnings(label: str, height: int, width: int, input_size: Any) -> list[str]:
    """Warnings for an image the model will read but should not be trusted on: smaller than the model's input
    (it is upscaled from almost nothing) or far from square (not a chest radiograph, or a strip of one)."""
    out = []
    if isinstance(input_size, int) and min(height, width) < input_size // 4:
        out.append(f"{label} is {width}x{height} px, far below the model's {input_size} px input: it is upscaled, "
                   "and a report from it is unlikely to mean anything")
    if max(height, width) > MAX_ASPECT * max(min(height, width), 1):
        out.append(f"{label} is {width}x{height} px; chest radiographs are close to square: is this the right "
                   "image?")
    return out


def study_warnings(labels: Sequence[str], views: Sequence[np.ndarray], predictor: Any) -> list[str]:
    """Every warning about a study's images for ``predictor`` (generate and the server say the same): each view's
    :func:`view_warnings`, and a lateral view the checkpoint does not read."""
    size = predictor.describe().get("image_size")
    out = [w for label, view in zip(labels, views) for w in view_warnings(label, view.shape[0], view.shape[1], size)]
    if len(views) > predictor.max_views:
        out.append(f"this checkpoint reads {predictor.max_views} view(s); the lateral image was not used")
    return out


#: The heatmap PNG is drawn at a display size: the longer side brought within these bounds (aspect kept).
HEATMAP_MAX_SIDE = 2048
HEATMAP_MIN_SIDE = 512


def heatmap_overlay_png(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45,
                        caption: Optional[str] = None, display_size: bool = True) -> bytes:
    """PNG bytes of ``heat`` (0..1, [H, W]) as a colour map over the grayscale ``image``; ``caption`` (e.g.
    which finding the map is of) is written on a dark band under the image, so the file says what it shows.
    With ``display_size`` the picture is scaled so its longer side lies within HEATMAP_MIN_SIDE..HEATMAP_MAX_SIDE
    pixels; without, it keeps the image's size (a caller that has already sized it, such as the web page)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    from ifnet.data.images import to_uint8

    gray8, heat = to_uint8(image), np.asarray(heat, dtype=np.float32)
    h, w = gray8.shape
    # a display size: a 6000 px radiograph need not cost gigabytes, nor a tiny one be unreadable
    scale = 1.0
    if display_size:
        scale = min(HEATMAP_MAX_SIDE / max(h, w), 1.0) if max(h, w) > HEATMAP_MIN_SIDE else HEATMAP_MIN_SIDE / max(h, w)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray8 = cv2.resize(gray8, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    gray = gray8.astype(np.float32) / 255.0
    rgb = np.repeat(gray[..., None], 3, axis=2)
    colours = colormaps["jet"](np.clip(heat, 0, 1), bytes=True)[..., :3].astype(np.float32) / 255.0
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    out = Image.fromarray(((rgb * (1 - weight) + colours * weight) * 255).round().astype(np.uint8))
    if caption:
        size = max(10, out.width // 40)
        font = ImageFont.load_default(size=size)
        band = int(size * 1.8)
        framed = Image.new("RGB", (out.width, out.height + band), (0, 0, 0))
        framed.paste(out, (0, 0))
        ImageDraw.Draw(framed).text((size // 2, out.height + (band - size) // 2), caption, fill=(255, 255, 255),
                                    font=font)
        out = framed
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
