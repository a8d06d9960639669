"""Worker jobs of the quality benchmark: train one IFNet variant on cached features, then decode.

Each job runs in its own spawned process with one torch thread (the benchmark runs one job per core:
on two cores two single-threaded jobs beat one two-threaded job, and on a busy machine much more so).
A job trains with :class:`ifnet.train.trainer.Trainer` (model selection on validation only), reloads
the best checkpoint, and decodes:

* validation, twice: conditioned on the label head's probabilities thresholded per label (the model's
  default: thresholds the trainer chose on validation with :func:`ifnet.baselines.choose_thresholds` and
  stored in the checkpoint) and on the raw probabilities. The mode with the higher validation CE
  macro-F1 is kept.
* test, once, in the kept mode.

A third validation decode, conditioned on the validation *reference* labels, is a diagnostic only (does
the decoder say what its condition says?); it is recorded and never used for a choice.

Only image features reach the model at test time; the reference reports are used for scoring in the
parent process only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np


@dataclass
class JobSpec:
    name: str  # run folder name and system key
    config_path: str  # YAML of the CPU-budget config
    overrides: list[str]  # --set style "key=value"
    features_dir: str  # folder of feature shards (features.load_sets)
    iec: str  # none | clahe | adaptive: which feature set trains and decodes (and the run config's data.iec)
    out_dir: str
    feature_kind: Optional[str] = None  # the stored kind to load instead of ``iec`` (the top-tuned features)
    blank: bool = False  # text-only floor: every study gets the features of a black image
    test_ids: list[str] = field(default_factory=list)
    annotation: str = ""
    image_root: str = ""
    threads: int = 1
    # findings-preserving MBR decoding (ifnet.decoding.mbr) over this many samples: tried on validation at the
    # chosen condition mode and guidance, and kept for test only if it raises the validation monitor; 0 = never
    mbr_samples: int = 0


def init_worker(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)


def _feature_source(spec: JobSpec, cfg: Any) -> Any:
    import torch

    from quality.features import FeatureSet, blank_features, load_sets
    from ifnet.train.data import image_config

    if spec.feature_kind:
        kind = spec.feature_kind
        sets, _ = load_sets(Path(spec.features_dir), (kind,))
    else:
        kind = "none" if spec.blank else spec.iec
        sets, _ = load_sets(Path(spec.features_dir), ("none",) if kind == "none" else ("none", "clahe"))
    source = sets[kind]
    if spec.blank:
        blank = blank_features(image_config(cfg.data), cfg.data.max_views, cfg.model.extractor, cfg.model.weights_path)
        return FeatureSet({sid: blank for sid in source.features}, source.masks)
    del sets
    return source


def _decode(model: Any, tokenizer: Any, ids: list[str], source: Any, cfg: Any, condition: Optional[np.ndarray],
            beam: int, max_len: int, guidance: float = 0.0, amplify_repeats: bool = False,
            mbr_samples: int = 0) -> dict[str, str]:
    """Reports for ``ids``; ``condition`` [N, 14] (0/1 or probabilities), or None for the model's default
    (its label head's probabilities at its stored thresholds). Beam 1 is greedy with trigram blocking.
    ``mbr_samples`` > 0: findings-preserving MBR (``ifnet.evaluation.mbr_options``)."""
    import torch

    from ifnet.evaluation import mbr_options

    options = mbr_options(mbr_samples, tokenizer, cfg.data.cleaner)
    hyps: dict[str, str] = {}
    model.eval()
    bs = 32
    with torch.no_grad():
        for start in range(0, len(ids), bs):
            chunk = ids[start:start + bs]
            feats = torch.stack([source.get(i)[0] for i in chunk]).float()
            mask = torch.stack([source.get(i)[1] for i in chunk])
            cond = None if condition is None else torch.tensor(condition[start:start + bs], dtype=torch.float32)
            enc = model.encode(None, mask, cond, features=feats)
            toks = model.decode(enc, beam_size=beam, max_len=max_len, guidance=guidance,
                                amplify_repeats=amplify_repeats, **options)
            for sid, row in zip(chunk, toks.tolist()):
                hyps[sid] = tokenizer.decode(row)
    return hyps


def repeated_words(report: str) -> list[str]:
    """Words written twice or more in a row in ``report`` (whitespace tokens, punctuation included)."""
    words = report.split()
    return [a for a, b in zip(words, words[1:]) if a == b]


def stutter_count(hyps: dict[str, str], allowed: set[str]) -> int:
    """Reports with an immediately repeated word that no training report repeats (``allowed``: the words
    the cleaned training reports do repeat, e.g. IU-Xray's anonymiser mask ``xxxx``)."""
    return sum(1 for h in hyps.values() if any(w not in allowed for w in repeated_words(h)))


# Guidance weights tried on validation (ifnet.decoding.guidance); 0 is plain beam search.
GUIDANCE_GRID = (0.0, 1.0, 2.0, 3.0)


def train_and_decode(spec: JobSpec) -> dict:
    """Train, select on validation, decode validation (two condition modes) and test (once)."""
    t0 = time.time()
    c0 = time.process_time()
    init_worker(spec.threads)
    from ifnet.baselines import apply_thresholds, choose_thresholds
    from ifnet.config import resolve
    from ifnet.labels import to_binary
    from ifnet.metrics.scoring import compute_scores, reference_labels
    from ifnet.models.checkpoint import load_checkpoint
    from ifnet.train.config import TrainConfig
    from ifnet.train.trainer import Trainer, monitor_score

    overrides = list(spec.overrides) + [f"data.annotation={spec.annotation}", f"data.image_root={spec.image_root}",
                                        f"data.iec={spec.iec}"]
    cfg = resolve(TrainConfig, spec.config_path, overrides)
    source = _feature_source(spec, cfg)
    t_feat = time.time() - t0
    trainer = Trainer(cfg, Path(spec.out_dir), feature_cache=source)
    result = trainer.fit()
    t_train = time.time() - t0 - t_feat

    model, tokenizer, _, _ = load_checkpoint(Path(spec.out_dir) / "best", map_location="cpu")
    cfg = trainer.cfg
    val_ids = [s.id for s in trainer.val_studies]
    train_labels = np.stack([trainer.labels[s.id] for s in trainer.train_studies])
    val_refs = {s.id: s.report for s in trainer.val_studies}
    val_codes = reference_labels(val_refs, cleaner=cfg.data.cleaner)
    beam, max_len = cfg.eval.beam_size, cfg.eval.max_len
    allowed = {w for s in trainer.train_studies for w in repeated_words(tokenizer.clean(s.report))}

    val_modes: dict[str, dict] = {}
    # The checkpoint carries per-label thresholds the trainer chose on validation (the model's default
    # condition); the probabilities mode passes the raw label-head probabilities as the condition instead.
    # Each (condition mode, guidance weight) is scored on validation; the training monitor picks one.
    val_probs = _label_probs(model, val_ids, source)
    thresholds = model.label_thresholds.numpy().astype(np.float64)
    choice = choose_thresholds(to_binary(val_codes), val_probs, train_labels.mean(0))  # rule used per label
    conditions = {"thresholded": apply_thresholds(val_probs, thresholds), "probabilities": val_probs}
    settings = [("thresholded", w) for w in GUIDANCE_GRID] + [("probabilities", 0.0)]

    def val_scores(hyps: dict[str, str]) -> dict:
        scores = compute_scores(val_refs, hyps, cleaner=cfg.data.cleaner, metrics=("BLEU", "ROUGE_L", "CIDEr", "CE"),
                                ref_labels=val_codes)
        return dict(scores, distinct_reports=len(set(hyps.values())), stutter_reports=stutter_count(hyps, allowed))

    val_hyps: dict[str, dict[str, str]] = {}
    for mode, w in settings:
        hyps = _decode(model, tokenizer, val_ids, source, cfg, conditions[mode], beam, max_len, w)
        val_hyps[f"{mode} guidance={w:g}"] = hyps
        val_modes[f"{mode} guidance={w:g}"] = val_scores(hyps)
    chosen = max(settings, key=lambda mw: monitor_score(val_modes[f"{mw[0]} guidance={mw[1]:g}"], cfg.eval.monitor))
    mode, guidance = chosen
    chosen_val_hyps = val_hyps[f"{mode} guidance={guidance:g}"]
    # Findings-preserving MBR at the chosen setting: the same findings per study, other wording; kept only
    # if the validation monitor rises (it can only move through the text scores: CE is unchanged).
    mbr = 0
    if spec.mbr_samples > 0:
        key = f"{mode} guidance={guidance:g} mbr={spec.mbr_samples}"
        t_mbr = time.time()
        hyps = _decode(model, tokenizer, val_ids, source, cfg, conditions[mode], beam, max_len, guidance,
                       mbr_samples=spec.mbr_samples)
        val_modes[key] = dict(val_scores(hyps), seconds=time.time() - t_mbr)
        if monitor_score(val_modes[key], cfg.eval.monitor) > monitor_score(
                val_modes[f"{mode} guidance={guidance:g}"], cfg.eval.monitor):
            mbr, chosen_val_hyps = spec.mbr_samples, hyps
    val_consistency = _consistency(conditions[mode], chosen_val_hyps, cfg.data.cleaner)
    del val_hyps
    # Comparison only, never used for a choice: the chosen setting decoded without the guidance repeat cap
    # (ifnet.decoding.guidance), i.e. as this benchmark decoded before the cap existed.
    uncapped = None
    if guidance > 0:
        hyps = _decode(model, tokenizer, val_ids, source, cfg, conditions[mode], beam, max_len, guidance,
                       amplify_repeats=True)
        uncapped = dict(_floats(val_scores(hyps)), setting=f"{mode} guidance={guidance:g}", amplify_repeats=True)
    # Diagnostic only, never used for any choice: the validation *reference* labels as the condition. It
    # measures whether the decoder verbalises its condition at all (an upper bound for this decoder).
    oracle = {}
    for w in sorted({0.0, guidance}):
        hyps_oracle = _decode(model, tokenizer, val_ids, source, cfg, to_binary(val_codes), beam, max_len, w)
        scores = compute_scores(val_refs, hyps_oracle, cleaner=cfg.data.cleaner, metrics=("BLEU", "CE"),
                                ref_labels=val_codes)
        scores["distinct_reports"] = len(set(hyps_oracle.values()))
        oracle[f"guidance={w:g}"] = _floats(scores)

    # Test: decoded once, in the mode chosen above. Only features go in.
    test_probs = _label_probs(model, spec.test_ids, source)
    cond = test_probs if mode == "probabilities" else apply_thresholds(test_probs, thresholds)
    test_hyps = _decode(model, tokenizer, spec.test_ids, source, cfg, cond, beam, max_len, guidance, mbr_samples=mbr)
    return {
        "name": spec.name, "iec": spec.iec, "feature_kind": spec.feature_kind, "blank": spec.blank,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        f"best_val_{cfg.eval.monitor}": result.best_score,
        "history": [{k: v for k, v in row.items() if isinstance(v, (int, float, str))} for row in result.history],
        "val_condition_modes": {m: _floats(s) for m, s in val_modes.items()},
        "condition_mode": mode, "guidance": guidance, "mbr_samples": mbr, "monitor": cfg.eval.monitor,
        "val_oracle_condition_diagnostic": oracle,
        # reference-free: does each report say its condition's findings (ifnet.metrics.consistency)?
        "val_consistency": val_consistency,
        "test_consistency": _consistency(cond, test_hyps, cfg.data.cleaner),
        "val_chosen_setting_uncapped": uncapped,
        "test_stutter_reports": stutter_count(test_hyps, allowed), "repeatable_words": sorted(allowed),
        "thresholds": {name: dict(row, threshold=float(t)) for (name, row), t in zip(choice.as_dict().items(),
                                                                                   thresholds)},
        "test_hyps": test_hyps,
        "val_hyps": chosen_val_hyps,  # the chosen setting's validation reports (the two-truth view)
        "test_label_probs": test_probs.tolist(),
        "val_label_probs": val_probs.tolist(), "val_ids": val_ids,
        "train_label_prevalence": train_labels.mean(0).tolist(),
        "seconds": {"load_features": t_feat, "train": t_train, "decode": time.time() - t0 - t_feat - t_train,
                    "total": time.time() - t0, "cpu": time.process_time() - c0},
        "config": json.loads(json.dumps(_to_dict(cfg))),
        "pid": os.getpid(),
    }


def _label_probs(model: Any, ids: list[str], source: Any) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            chunk = ids[start:start + 64]
            feats = torch.stack([source.get(i)[0] for i in chunk]).float()
            mask = torch.stack([source.get(i)[1] for i in chunk])
            vis = model.encode_features(feats, mask)
            out.append(torch.sigmoid(model.predict_labels(vis)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 14), dtype=np.float32)


def _consistency(condition: np.ndarray, hyps: dict[str, str], cleaner: Optional[str]) -> dict:
    """Each report against the condition it was decoded from (rows of ``condition`` follow ``hyps``)."""
    from ifnet.metrics.consistency import check_reports

    _, summary = check_reports(condition, list(hyps.values()), cleaner=cleaner)
    return summary


def _floats(scores: dict) -> dict:
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


def _to_dict(cfg: Any) -> dict:
    from ifnet.config import to_dict

    return to_dict(cfg)
