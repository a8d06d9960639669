"""Decoding a set of studies with a model: reports, predicted findings, optional loss.

Shared by validation in the trainer and by `ifnet evaluate`. Only images (or cached features) and
the view mask reach the model: reference tokens and labels in a batch are used for nothing but the
optional validation loss, which is computed *after* decoding and never feeds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ifnet.data.tokenizer import Tokenizer
from ifnet.errors import IFNetError
from ifnet.labels import OBSERVATIONS
from ifnet.models.ifnet import IFNet


@torch.no_grad()
def decode_studies(model: IFNet, ds: Dataset, tokenizer: Tokenizer, data_cfg: Any, *, device: torch.device,
                   beam_size: int = 3, max_len: int = 60, guidance: float = 0.0, mbr_samples: int = 0,
                   with_loss: bool = False, batch_size: Optional[int] = None, progress: bool = False) -> list[dict]:
    """One dict per study: id, generated report, reference (raw), label probabilities [14], the condition
    the report was decoded from [14] (the thresholded predictions, or the probabilities, as the model is
    set), and ``loss`` (teacher-forced, conditioned on predicted labels) when ``with_loss``. With
    ``mbr_samples`` > 0 the report is chosen by findings-preserving minimum Bayes-risk decoding
    (:mod:`ifnet.decoding.mbr`, findings read by :func:`findings_reader`)."""
    from tqdm import tqdm

    from ifnet.train.data import build_loader

    was_training = model.training
    model.eval()
    loader = build_loader(ds, data_cfg, train=False, seed=0, batch_size=batch_size)
    options = mbr_options(mbr_samples, tokenizer, data_cfg.cleaner)
    results: list[dict] = []
    try:
        for batch in tqdm(loader, desc="decoding", leave=False, disable=not progress):
            view_mask = batch["view_mask"].to(device)
            images = batch["images"].to(device) if "images" in batch else None
            features = batch["features"].to(device).float() if "features" in batch else None
            enc = model.encode(images, view_mask, None, features=features)  # None: predicted labels
            tokens = model.decode(enc, beam_size=beam_size, max_len=max_len, guidance=guidance, **options)
            probs = torch.sigmoid(enc.label_logits).float().cpu().numpy()
            conditions = enc.condition.float().cpu().numpy()
            losses = None
            if with_loss:
                ref_tokens = batch["tokens"].to(device)
                out = model(images, view_mask, ref_tokens, None, features=features)
                losses = _per_study_caption_loss(out.logits, ref_tokens)
            for i, sid in enumerate(batch["ids"]):
                row = {"id": sid, "generated": tokenizer.decode(tokens[i].tolist()), "reference": batch["reports"][i],
                       "probabilities": probs[i], "condition": conditions[i]}
                if losses is not None:
                    row["loss"] = float(losses[i])
                results.append(row)
    finally:
        model.train(was_training)
    return results


def findings_reader(tokenizer: Tokenizer, cleaner: Optional[str]) -> Any:
    """Token lists -> their 0/1 findings ``[n, 14]``: the decoded text, prepared as the metrics prepare it,
    labelled by the project's labeler (uncertain counted as positive). What findings-preserving MBR keeps."""
    from ifnet.labels import to_binary
    from ifnet.metrics.consistency import label_generated

    def read(sequences: list[list[int]]) -> np.ndarray:
        return to_binary(label_generated([tokenizer.decode(seq) for seq in sequences], cleaner=cleaner))

    return read


def mbr_options(mbr_samples: int, tokenizer: Tokenizer, cleaner: Optional[str]) -> dict:
    """Decoding options for ``IFNet.decode``: none when ``mbr_samples`` is 0, else findings-preserving MBR."""
    if not mbr_samples:
        return {}
    return {"mbr_samples": int(mbr_samples), "findings_of": findings_reader(tokenizer, cleaner)}


@torch.no_grad()
def label_probabilities(model: IFNet, ds: Dataset, data_cfg: Any, *, device: torch.device,
                        batch_size: Optional[int] = None) -> tuple[list[str], np.ndarray]:
    """Study ids and the label head's probabilities ``[N, 14]`` (images or cached features only; no decoding)."""
    from ifnet.train.data import build_loader

    was_training = model.training
    model.eval()
    ids: list[str] = []
    probs = []
    try:
        for batch in build_loader(ds, data_cfg, train=False, seed=0, batch_size=batch_size):
            view_mask = batch["view_mask"].to(device)
            if "features" in batch:
                visual = model.encode_features(batch["features"].to(device).float(), view_mask)
            else:
                visual = model.encode_images(batch["images"].to(device), view_mask)
            probs.append(torch.sigmoid(model.predict_labels(visual)).float().cpu().numpy())
            ids.extend(batch["ids"])
    finally:
        model.train(was_training)
    return ids, np.concatenate(probs) if probs else np.zeros((0, len(OBSERVATIONS)), dtype=np.float32)


def _per_study_caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    targets = tokens[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=0, reduction="none")
    mask = (targets != 0).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def findings_dict(probs: np.ndarray) -> dict[str, float]:
    return {name: round(float(p), 4) for name, p in zip(OBSERVATIONS, probs)}


def _training_data_config(meta: dict, checkpoint: Path) -> Any:
    """The DataConfig the checkpoint was trained with (image size, views, IEC): evaluation must match it."""
    from ifnet.config import from_dict
    from ifnet.train.config import TrainConfig

    train_cfg = (meta.get("metadata") or {}).get("train_config")
    if not train_cfg:
        raise IFNetError(f"{checkpoint}: has no training config in meta.json; cannot know its preprocessing")
    return from_dict(TrainConfig, train_cfg, source=f"{checkpoint}/meta.json").data


def _no_iec_note(first_image: Path) -> str:
    """The page's note for a model configured without IEC: its images may still have been enhanced offline
    (``ifnet enhance`` records that in each PNG it writes)."""
    from ifnet.iec.enhance import read_stored_info

    info = read_stored_info(first_image) if Path(first_image).suffix.lower() == ".png" else None
    if info and info.get("clahe_applied"):
        return ("the images were enhanced offline by `ifnet enhance` (data.iec none): the panels show them as the "
                "model read them")
    return "the model reads the images unenhanced (data.iec none): no IEC panels"


def evaluate_checkpoint(checkpoint: Path, out: Path, *, split: str = "test", annotation: Optional[Path] = None,
                        image_root: Optional[Path] = None, beam_size: Optional[int] = None,
                        max_len: Optional[int] = None, guidance: Optional[float] = None,
                        mbr_samples: Optional[int] = None, limit: Optional[int] = None, meteor: bool = True,
                        examples: int = 24, device: str = "auto", notes: tuple[str, ...] = ()) -> dict:
    """Decode ``split`` with ``checkpoint``; write predictions.json, metrics.json, consistency.json (each report
    against the condition it was decoded from, :mod:`ifnet.metrics.consistency`) and index.html to ``out``."""
    from dataclasses import replace

    from ifnet.data.annotation import load_annotation
    from ifnet.data.dataset import ReportDataset
    from ifnet.data.images import read_xray, to_uint8
    from ifnet.iec.clahe import build_enhancer
    from ifnet.inference import guidance_weight, mbr_sample_count, positive_count
    from ifnet.io_utils import atomic_write_json
    from ifnet.metrics.consistency import CONDITION_CUTOFF, check_reports, consistency_note
    from ifnet.metrics.scoring import score_reports
    from ifnet.models.checkpoint import load_checkpoint
    from ifnet.report_page import Example, write_page
    from ifnet.train.data import image_config
    from ifnet.train.trainer import resolve_device

    dev = resolve_device(device)
    model, tokenizer, _, meta = load_checkpoint(checkpoint, map_location=dev)
    d = _training_data_config(meta, checkpoint)
    d = replace(d, annotation=str(annotation or d.annotation), image_root=str(image_root or d.image_root))
    if annotation is None and not Path(d.annotation).is_file():
        raise IFNetError(f"{d.annotation}: not found (data.annotation of the checkpoint's training config); "
                         "pass --annotation")
    if image_root is None and not Path(d.image_root).is_dir():
        raise IFNetError(f"{d.image_root}: no such folder (data.image_root of the checkpoint's training config); "
                         "pass --image-root")
    train_eval = (meta.get("metadata") or {}).get("train_config", {}).get("eval", {})
    beam = positive_count("--beam-size", beam_size, int(train_eval.get("beam_size", 3)))
    length = positive_count("--max-len", max_len, int(train_eval.get("max_len", 60)))
    guide = guidance_weight(guidance, train_eval.get("guidance", 0.0))
    mbr = mbr_sample_count(mbr_samples, train_eval.get("mbr_samples", 0))
    ann = load_annotation(d.annotation, d.image_root, check_images=True, splits=(split,), max_views=d.max_views)
    studies = ann.split(split)
    if limit is not None:
        studies = studies[: positive_count("--limit", limit, 0)]
    if not studies:
        raise IFNetError(f"{d.annotation}: split {split!r} is empty")
    ds = ReportDataset(studies, d.image_root, tokenizer, image_config(d), d.max_tokens, None, train=False)
    preds = decode_studies(model, ds, tokenizer, d, device=dev, beam_size=beam, max_len=length, guidance=guide,
                           mbr_samples=mbr, progress=True)
    refs = {p["id"]: p["reference"] for p in preds}
    hyps = {p["id"]: p["generated"] for p in preds}
    metrics_list = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "CE") if meteor else ("BLEU", "ROUGE_L", "CIDEr", "CE")
    report = score_reports(refs, hyps, cleaner=d.cleaner, metrics=metrics_list)
    metrics = dict(report.scores)
    # Reference-free: does each report say the findings it was decoded from?
    checked, consistency = check_reports(np.stack([p["condition"] for p in preds]), [p["generated"] for p in preds],
                                         cleaner=d.cleaner)
    rows = []
    per_study = {r["id"]: r for r in report.per_study}
    for p, said in zip(preds, checked):
        ref_labels = per_study.get(p["id"], {}).get("ref_labels", {})
        rows.append({"id": p["id"], "generated": p["generated"], "reference": p["reference"],
                     "predicted_findings": findings_dict(p["probabilities"]),
                     "condition": findings_dict(p["condition"]), "consistency": said.to_json(),
                     "reference_labels": ref_labels})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "predictions.json", rows)
    atomic_write_json(out / "metrics.json", {**metrics, "split": split, "num_studies": len(preds),
                                             "beam_size": beam, "max_len": length, "guidance": guide, "mbr_samples": mbr,
                                             "checkpoint": str(checkpoint)})
    atomic_write_json(out / "consistency.json", {**consistency, "split": split, "checkpoint": str(checkpoint)})
    # The enhanced panels show what the model read; a model trained without IEC gets none (it never saw them).
    enhancer = build_enhancer(d.iec, d.clip_limit, d.tile_grid) if d.iec != "none" else None
    page_examples = []
    for study, row in zip(studies[:examples], rows[:examples]):
        views = [read_xray(p) for p in ann.image_files(study)[: d.max_views]]
        page_examples.append(Example(
            study.id, row["generated"], row["reference"], images=[to_uint8(v) for v in views],
            enhanced=[to_uint8(enhancer(v)) for v in views] if enhancer is not None else [],
            findings=row["predicted_findings"],
            reference_findings=[k for k, v in row["reference_labels"].items() if v in (1, -1)],
            condition=[k for k, v in row["condition"].items() if v >= CONDITION_CUTOFF], consistency=row["consistency"]))
    write_page(out / "index.html", f"IFNet evaluation: {split} split ({len(preds)} studies)", page_examples,
               metrics={k: v for k, v in metrics.items()},
               curves_png=Path(checkpoint).parent / "curves.png",
               notes=[*notes, *([_no_iec_note(ann.image_files(studies[0])[0])] if enhancer is None and studies else []),
                      f"checkpoint {checkpoint}; beam {beam}; condition guidance {guide:g}; "
                                  f"{f'MBR over {mbr} samples; ' if mbr else ''}"
                                  f"CE uncertain -> {metrics.get('CE_uncertain', 'positive')}",
                      consistency_note(consistency)])
    return {"metrics": metrics, "predictions": rows, "consistency": consistency}
