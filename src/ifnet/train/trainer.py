"""The training loop: teacher forcing + label BCE, validation scoring each epoch, model selection on
the validation split only, atomic `last`/`best` checkpoints, exact `--resume`, optional DDP.

The test split is never loaded here: it is decoded only by `ifnet evaluate`.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ifnet.config import to_dict
from ifnet.data.annotation import Study, load_annotation, load_label_file
from ifnet.data.tokenizer import Tokenizer
from ifnet.errors import IFNetError
from ifnet.io_utils import atomic_write_json, read_json
from ifnet.labels import NUM_OBSERVATIONS, OBSERVATIONS, to_binary
from ifnet.models.checkpoint import load_checkpoint, load_training_state, recover_checkpoint, save_checkpoint
from ifnet.models.ifnet import IFNet, compute_losses
from ifnet.train import distributed as dist_utils
from ifnet.train.config import TrainConfig, is_torch_device, with_absolute_paths
from ifnet.train.data import build_loader, make_dataset, repeat_factors
from ifnet.train.ema import WeightEMA
from ifnet.train.logs import MetricsLog, plot_curves
from ifnet.train.runinfo import run_provenance, seed_everything

LAST, BEST = "last", "best"
#: Everything a run writes into its folder: a fresh run refuses a folder holding any of them (they would be
#: overwritten) unless asked to start afresh, which removes exactly these and nothing else.
RUN_ENTRIES = ("config.json", "provenance.json", "vocab.json", "metrics.csv", "tensorboard", "curves.png",
               "result.json", LAST, BEST)


class TrainingDiverged(IFNetError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_torch_device(name):
        raise IFNetError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, mps ...)")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IFNetError(f"device {name!r} requested but CUDA is not available")
    return dev


# Parameters that carry the label condition into the report (plus memory.label_to_slot): their own
# learning rate, optim.lr_rest * optim.condition_lr_scale.
CONDITION_PARAMETERS = ("condition_proj", "condition_logits")


def study_labels(studies: list[Study], label_file: Optional[str]) -> dict[str, np.ndarray]:
    """0/1 label vectors [14] for training: from ``label_file`` where given, else the offline labeler.

    These are the text encoder's outputs for *training* reports; they never reach evaluation.
    """
    given = load_label_file(label_file) if label_file else {}
    out = {s.id: np.asarray(given[s.id], dtype=np.float32) for s in studies if s.id in given}
    missing = [s for s in studies if s.id not in out]
    if missing:
        from ifnet.labeler import label_reports

        codes = label_reports([s.report for s in missing])
        for s, row in zip(missing, to_binary(codes)):
            out[s.id] = row.astype(np.float32)
    return out


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64),
             "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"].to(torch.uint8))
    np.random.set_state(("MT19937", state["numpy"].astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"].to(torch.uint8)))


class Trainer:
    def __init__(self, config: TrainConfig, out_dir: Path, *, resume: bool = False,
                 feature_cache: Any = None) -> None:
        """``feature_cache``: precomputed backbone features (anything with ``get(study_id) -> (features
        [V, C, h, w], view_mask [V])``, e.g. a :class:`~ifnet.train.feature_cache.FeatureCache`) for every
        train and val study, used instead of building one when ``cache_features`` is on. A benchmark that
        trains several models on the same frozen features computes them once this way."""
        self.cfg = config = with_absolute_paths(config)  # config.json must work from any directory
        self._given_feature_cache = feature_cache
        self.out = Path(out_dir)
        self.dist = dist_utils.init_from_env()
        self.is_main = self.dist.rank == 0
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        seed_everything(config.seed, self.dist.rank, deterministic=config.deterministic)
        self.resume = resume
        self._bad_streak = 0  # consecutive non-finite steps (see fit)
        self._prepare_data()
        self._build_model()

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        d = self.cfg.data
        if not d.annotation or not d.image_root:
            raise IFNetError("data.annotation and data.image_root must be set (in the YAML or with --set)")
        # A slice run (data.train_limit / data.val_limit) reads, checks and caches only its slice.
        ann = load_annotation(d.annotation, d.image_root, check_images=True, splits=("train", "val"),
                              max_views=d.max_views, image_check_limits={"train": d.train_limit, "val": d.val_limit})
        self.train_studies, self.val_studies = ann.split("train")[: d.train_limit], ann.split("val")[: d.val_limit]
        if not self.train_studies or not self.val_studies:
            raise IFNetError(f"{d.annotation}: need non-empty train and val splits for training and model selection")
        vocab_path = self.out / "vocab.json"
        if self.resume and vocab_path.exists():
            self.tokenizer = Tokenizer.load(vocab_path)
        else:
            self.tokenizer = Tokenizer.build([s.report for s in self.train_studies], cleaner=d.cleaner,
                                             threshold=d.vocab_threshold)
        self.labels = study_labels(self.train_studies + self.val_studies, d.labels)
        # What the label head learns when it is not the condition labels above (data.head_labels).
        self.head_labels = self._load_head_labels(d.head_labels) if d.head_labels else None
        self._set_repeat_factors()
        self.val_refs = {s.id: s.report for s in self.val_studies}
        from ifnet.metrics.scoring import reference_labels

        # Reference labels of the validation reports, computed once (CE each epoch compares against them).
        self.val_ref_codes = reference_labels(self.val_refs, cleaner=d.cleaner) if self.val_refs else None

    def _load_head_labels(self, path: str) -> dict[str, np.ndarray]:
        """``data.head_labels``: given labels for the label head, the condition labels where a study has none.

        A file that names none of the training studies is an error (a wrong file would otherwise train the
        head on the condition labels without a word); partial coverage is reported."""
        given = load_label_file(path)
        covered = sum(s.id in given for s in self.train_studies)
        if covered == 0:
            raise IFNetError(f"{path}: data.head_labels holds labels for none of the "
                             f"{len(self.train_studies)} training studies (ids such as {self.train_studies[0].id!r})")
        if covered < len(self.train_studies) and self.is_main:
            print(f"note: {path}: data.head_labels covers {covered} of {len(self.train_studies)} training studies; "
                  f"the others' label head learns the condition labels", flush=True)
        return {**self.labels, **{k: v.astype(np.float32) for k, v in given.items() if k in self.labels}}

    def _set_repeat_factors(self) -> None:
        """Per-study repeat factors of the training studies (``data.repeat_threshold``; None: plain shuffle)
        and, with ``data.repeat_reweight_labels``, their label-loss weights 1 / factor by study id."""
        d = self.cfg.data
        self.repeat_factors: Optional[np.ndarray] = None
        self.label_loss_weights: Optional[dict[str, float]] = None
        if d.repeat_threshold is None:  # (the settings' ranges are checked by DataConfig itself)
            return
        findings = np.stack([self.labels[s.id] for s in self.train_studies])[:, :NUM_OBSERVATIONS - 1]
        self.repeat_factors = repeat_factors(findings, d.repeat_threshold)
        if d.repeat_reweight_labels:
            self.label_loss_weights = {s.id: 1.0 / float(r) for s, r in zip(self.train_studies, self.repeat_factors)}

    def _build_model(self) -> None:
        mcfg = replace(self.cfg.model, vocab_size=len(self.tokenizer), max_views=self.cfg.data.max_views)
        self.cfg = replace(self.cfg, model=mcfg)
        self.model = IFNet(mcfg).to(self.device)
        self.feature_cache = None
        if self.cfg.cache_features:
            if not mcfg.freeze_extractor:
                raise IFNetError("cache_features needs model.freeze_extractor=true (a trained CNN changes its features)")
            from ifnet.train.feature_cache import FeatureCache

            if self._given_feature_cache is not None:
                self.feature_cache = self._given_feature_cache
            else:
                self.feature_cache = FeatureCache.build(self.model, self.train_studies + self.val_studies,
                                                        self.cfg.data, self.device)
        elif self._given_feature_cache is not None:
            raise IFNetError("a feature_cache was given but cache_features is off")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        visual = [p for n, p in named if n.startswith("extractor.")]
        condition = [p for n, p in named if n.split(".")[0] in CONDITION_PARAMETERS or n == "memory.label_to_slot"]
        taken = {id(p) for p in visual + condition}
        rest = [p for n, p in named if id(p) not in taken]
        o = self.cfg.optim
        groups = [{"params": rest, "lr": o.lr_rest}]
        if condition:
            groups.append({"params": condition, "lr": o.lr_rest * o.condition_lr_scale})
        if visual:
            groups.insert(0, {"params": visual, "lr": o.lr_visual})
        self._rest_group = 1 if visual else 0  # the group whose lr the logs report
        self.optimizer = torch.optim.Adam(groups, weight_decay=o.weight_decay, amsgrad=o.amsgrad)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=o.step_size, gamma=o.gamma)
        self.ddp_model: nn.Module = dist_utils.wrap(self.model, self.dist,
                                                    find_unused_parameters=self.feature_cache is not None)
        self.use_amp = bool(o.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ema = WeightEMA(self.model, o.ema_decay) if o.ema_decay is not None else None

    @property
    def eval_model(self) -> IFNet:
        """The model validated and saved: the weight average with ``optim.ema_decay``, else the trained one."""
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints ------------------------------------------------------------------------------
    def _training_state(self, epoch: int, step: int, best: float, best_epoch: int, bad_epochs: int) -> dict:
        state = {"epoch": epoch, "step": step, "best_score": best, "best_epoch": best_epoch,
                 "epochs_without_improvement": bad_epochs, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": _rng_state(), "config": to_dict(self.cfg)}
        if self.ema is not None:  # the checkpoint's weights are the average; resuming needs the trained ones too
            state["ema"] = {"updates": self.ema.updates, "trained_weights": self.model.state_dict()}
        return state

    def _save(self, name: str, state: dict, metrics: dict) -> None:
        if not self.is_main:
            return
        # Only `last` carries the optimizer, scheduler and RNG state (--resume reads `last`): in `best` it would be
        # dead weight, twice the model's size with Adam (0.5 GB at ResNet-101 size).
        save_checkpoint(self.out / name, self.eval_model, self.cfg.model, self.tokenizer,
                        training_state=state if name == LAST else None,
                        metadata={"epoch": state["epoch"], "val_metrics": metrics, "train_config": to_dict(self.cfg),
                                  "provenance": self.provenance})

    def _restore(self) -> dict:
        ckpt = self.out / LAST
        if self.is_main:  # a run killed inside a checkpoint save may have left one aside, or a temporary folder
            for name in (LAST, BEST):
                recover_checkpoint(self.out / name)
        dist_utils.barrier(self.dist)
        model, tokenizer, _, _ = load_checkpoint(ckpt, map_location=self.device)
        if tokenizer.tokens != self.tokenizer.tokens:
            raise IFNetError(f"{ckpt}: its vocabulary differs from this run's; cannot resume")
        state = load_training_state(ckpt)
        if state is None:
            raise IFNetError(f"{ckpt}: has no training state to resume from")
        if (self.ema is None) != ("ema" not in state):
            raise IFNetError(f"{ckpt}: was trained {'with' if 'ema' in state else 'without'} a weight average; "
                             f"resume it with the same optim.ema_decay")
        if self.ema is not None:
            self.ema.module.load_state_dict(model.state_dict())
            self.ema.updates = int(state["ema"]["updates"])
            self.model.load_state_dict(state["ema"]["trained_weights"])
        else:
            self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return state

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.provenance = run_provenance(cfg.seed)
        # A resume reads its checkpoint before anything in the run folder is written: one that cannot be
        # resumed (another model size, vocabulary or EMA setting) leaves the run as it was.
        state = self._restore() if self.resume else None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.out / "vocab.json")
            atomic_write_json(self.out / "config.json", to_dict(cfg))
            provenance = self.provenance
            if self.resume and (self.out / "provenance.json").exists():  # the run's start stays; resumes are added
                first = read_json(self.out / "provenance.json")
                provenance = {**first, "resumed": list(first.get("resumed", [])) + [self.provenance]}
            atomic_write_json(self.out / "provenance.json", provenance)
        log = MetricsLog(self.out / "metrics.csv", self.out / "tensorboard" if self.is_main else None) \
            if self.is_main else None
        start_epoch, step, best, best_epoch, bad_epochs = 1, 0, -math.inf, 0, 0
        if state is not None:
            start_epoch = int(state["epoch"]) + 1
            step, best = int(state["step"]), float(state["best_score"])
            best_epoch, bad_epochs = int(state["best_epoch"]), int(state["epochs_without_improvement"])
            if log is not None:
                log.load(upto_epoch=start_epoch - 1)
        train_ds = make_dataset(self.train_studies, cfg.data, self.tokenizer, self.labels, train=True,
                                feature_cache=self.feature_cache)
        loader = build_loader(train_ds, cfg.data, train=True, seed=cfg.seed, dist=self.dist,
                              factors=self.repeat_factors)
        epoch = start_epoch - 1
        # Consecutive non-finite steps, counted across epoch boundaries: a run whose epochs are shorter
        # than optim.max_bad_steps must still stop when every step fails.
        self._bad_streak = 0
        for epoch in range(start_epoch, cfg.optim.epochs + 1):
            # Shuffling and augmentation are a function of (seed, epoch) alone, so a resumed run
            # sees exactly the batches the uninterrupted run would have seen.
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
            t0 = time.time()
            train_stats, step = self._train_epoch(loader, epoch, step)
            self.scheduler.step()
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                   "lr": self.optimizer.param_groups[self._rest_group]["lr"], "epoch_seconds": time.time() - t0}
            metrics: dict = {}
            if self.is_main:
                metrics = self.validate()
                row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            score = dist_utils.broadcast_float(monitor_score(metrics, cfg.eval.monitor), self.dist)
            improved = score > best
            if improved:
                best, best_epoch, bad_epochs = score, epoch, 0
            else:
                bad_epochs += 1
            state = self._training_state(epoch, step, best, best_epoch, bad_epochs)
            if log is not None:
                # Logged before the checkpoints: a kill between the two then redoes this epoch (its row is
                # dropped on resume) instead of resuming after it with its row missing.
                log.log(row)
            if improved:
                self._save(BEST, state, metrics)
            self._save(LAST, state, metrics)
            if log is not None:
                plot_curves(log.rows, self.out / "curves.png", title=f"{self.out.name}: training curves")
                print(f"epoch {epoch}: loss {train_stats['loss']:.4f}  val {cfg.eval.monitor} {score:.4f}"
                      f"{'  (best)' if improved else ''}", flush=True)
            if bad_epochs >= cfg.eval.patience:
                if self.is_main:
                    print(f"early stop: no validation improvement for {bad_epochs} epochs", flush=True)
                break
            dist_utils.barrier(self.dist)
        if log is not None:
            log.close()
        history = log.rows if log is not None else []
        checksums = dist_utils.gather_floats(weights_checksum(self.model), self.dist)
        if self.is_main:
            result = {"best_epoch": best_epoch, f"best_val_{cfg.eval.monitor}": best, "epochs_run": epoch,
                      "world_size": self.dist.world_size, "weights_checksum_per_rank": checksums}
            atomic_write_json(self.out / "result.json", result)
        return TrainResult(self.out, best_epoch, best, epoch, history)

    def _batch_inputs(self, batch: dict) -> dict:
        dev = self.device
        out = {"view_mask": batch["view_mask"].to(dev), "tokens": batch["tokens"].to(dev),
               "labels": batch["labels"].to(dev)}
        if "features" in batch:
            out["features"] = batch["features"].to(dev).float()
        else:
            out["images"] = batch["images"].to(dev)
        return out

    def _train_epoch(self, loader: DataLoader, epoch: int, step: int) -> tuple[dict, int]:
        from tqdm import tqdm

        o = self.cfg.optim
        self.ddp_model.train()
        if self.cfg.model.freeze_extractor:
            self.model.extractor.eval()
        totals = {"loss": 0.0, "report_loss": 0.0, "label_loss": 0.0}
        n, skipped = 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not self.is_main or None)
        for batch in bar:
            x = self._batch_inputs(batch)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                out = self.ddp_model(x.get("images"), x["view_mask"], x["tokens"], x["labels"],
                                     features=x.get("features"), label_forcing=o.label_forcing)
                weights = None if self.label_loss_weights is None else \
                    torch.tensor([self.label_loss_weights[i] for i in batch["ids"]], device=self.device)
                head_target = x["labels"] if self.head_labels is None else torch.from_numpy(
                    np.stack([self.head_labels[i] for i in batch["ids"]])).to(self.device)
                losses = compute_losses(out, x["tokens"], head_target, label_loss_weight=o.label_loss_weight,
                                        study_weights=weights, label_smoothing=o.report_label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss = losses["total"]
            ok = bool(torch.isfinite(loss))
            if ok:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                ok = bool(torch.isfinite(grad_norm)) or self.use_amp  # the AMP scaler skips inf steps itself
            ok = dist_utils.all_true(ok, self.dist)
            if not ok:
                self._bad_streak += 1
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.is_main:
                    print(f"warning: epoch {epoch} step {step}: non-finite loss or gradient; step skipped", flush=True)
                if self._bad_streak >= o.max_bad_steps:
                    raise TrainingDiverged(f"{self._bad_streak} consecutive non-finite steps; stopped. The last good "
                                           f"checkpoint is kept in {self.out / LAST}")
                continue
            self._bad_streak = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            step += 1
            n += 1
            totals["loss"] += float(loss.detach())
            totals["report_loss"] += float(losses["caption"].detach())
            totals["label_loss"] += float(losses["labels"].detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        # NaN, not 0, when every step was skipped: a zero loss would look like a perfect epoch.
        stats = {k: v / n if n else math.nan for k, v in totals.items()}
        stats["skipped_steps"] = float(skipped)
        return stats, step

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss, label AUC, and decoded-report scores on the validation split (rank 0 only)."""
        from ifnet.evaluation import decode_studies
        from ifnet.metrics.scoring import compute_scores

        cfg = self.cfg
        studies = [s for s in self.val_studies if s.id in self.val_refs]
        ds = make_dataset(studies, cfg.data, self.tokenizer, self.labels, train=False,
                          feature_cache=self.feature_cache)
        calibration = self.calibrate_thresholds(ds)
        thresholds = calibration.thresholds if calibration is not None else None
        decode = dict(device=self.device, beam_size=cfg.eval.beam_size, max_len=cfg.eval.max_len,
                      guidance=cfg.eval.guidance, mbr_samples=cfg.eval.mbr_samples, with_loss=True)
        if cfg.eval.crossfit_thresholds and calibration is not None:
            preds = self._decode_cross_fitted(studies, decode, calibration)
        else:
            preds = decode_studies(self.eval_model, ds, self.tokenizer, cfg.data, **decode)
        hyps = {p["id"]: p["generated"] for p in preds}
        metrics_list = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "CE") if cfg.eval.meteor else \
            ("BLEU", "ROUGE_L", "CIDEr", "CE")
        scores = compute_scores(self.val_refs, hyps, cleaner=cfg.data.cleaner, metrics=metrics_list,
                                uncertain=cfg.eval.uncertain, ref_labels=self.val_ref_codes)
        probs = np.stack([p["probabilities"] for p in preds])
        truth = np.stack([self.labels[p["id"]] for p in preds])
        aucs = {"label_auc": mean_auc(truth, probs)}
        if self.head_labels is not None:  # also against what the head learns (data.head_labels)
            aucs["head_label_auc"] = mean_auc(np.stack([self.head_labels[p["id"]] for p in preds]), probs)
        # NaN (no label with both classes in validation) is left out: checkpoint metadata is strict JSON.
        scores.update({k: v for k, v in aucs.items() if math.isfinite(v)})
        scores["loss"] = float(np.mean([p["loss"] for p in preds]))
        if thresholds is not None:
            scores["label_thresholds"] = thresholds
        return scores

    def calibrate_thresholds(self, ds: Any) -> Optional["Calibration"]:
        """Per-label thresholds of the thresholded condition, chosen on the validation split.

        The label head's validation probabilities against the validation studies' training labels (what the
        label head learns), by :func:`ifnet.baselines.choose_thresholds`: F1-optimal where validation holds
        at least 5 positives, else the cut whose positive rate matches the training prevalence. Installed in
        the model before validation decodes, so each checkpoint carries the thresholds it was scored with.
        Returns them (with the rule used per label, for the logs) and the probabilities they were chosen on;
        ``None`` when the model conditions on raw probabilities.
        """
        from ifnet.baselines import choose_thresholds
        from ifnet.evaluation import label_probabilities

        if self.model.config.condition_mode != "thresholded":
            return None
        ids, probs = label_probabilities(self.eval_model, ds, self.cfg.data, device=self.device)
        truth = np.stack([self.labels[i] for i in ids])
        prevalence = np.stack([self.labels[s.id] for s in self.train_studies]).mean(0)
        choice = choose_thresholds(truth, probs, prevalence)
        self.model.set_label_thresholds(choice.thresholds)  # the trained model conditions on them too
        self.eval_model.set_label_thresholds(choice.thresholds)
        return Calibration(list(ids), truth, probs, prevalence, choice.as_dict())

    def _decode_cross_fitted(self, studies: list[Study], decode: dict, calibration: "Calibration") -> list[dict]:
        """Validation reports with each half's condition cut at the thresholds chosen on the other half
        (``eval.crossfit_thresholds``), in ``studies`` order; the whole split's thresholds, installed by
        :meth:`calibrate_thresholds` (which gave ``calibration``), are put back afterwards (they are what the
        checkpoint keeps)."""
        from ifnet.baselines import cross_fitted_thresholds
        from ifnet.evaluation import decode_studies

        ids, truth, probs, prevalence = calibration.ids, calibration.truth, calibration.probs, calibration.prevalence
        half, chosen = cross_fitted_thresholds(truth, probs, prevalence, seed=0)
        half_of = dict(zip(ids, half.tolist()))
        model = self.eval_model
        whole = model.label_thresholds.detach().clone()
        preds: list[dict] = []
        try:
            for h in (0, 1):
                part = [s for s in studies if half_of[s.id] == h]
                model.set_label_thresholds(chosen[h])
                ds = make_dataset(part, self.cfg.data, self.tokenizer, self.labels, train=False,
                                  feature_cache=self.feature_cache)
                preds += decode_studies(model, ds, self.tokenizer, self.cfg.data, **decode)
        finally:
            model.set_label_thresholds(whole)
        order = {s.id: i for i, s in enumerate(studies)}
        return sorted(preds, key=lambda p: order[p["id"]])


class Calibration(NamedTuple):
    """What :meth:`Trainer.calibrate_thresholds` chose the validation thresholds on, and the choice."""

    ids: list[str]  # validation study ids, in the order of the rows below
    truth: np.ndarray  # [N, 14] their training labels (what the label head learns)
    probs: np.ndarray  # [N, 14] the label head's probabilities
    prevalence: np.ndarray  # [14] training prevalence (the rule for labels with few validation positives)
    thresholds: dict  # choose_thresholds(...).as_dict(): per-label threshold and rule, for the logs


def monitor_score(metrics: dict, monitor: str) -> float:
    """The model-selection score: one validation metric, or the sum of ``+``-joined ones. -inf when no
    metrics (non-main DDP ranks); an unknown name is an error listing the available ones."""
    if not metrics:
        return -math.inf
    total = 0.0
    for name in (part.strip() for part in monitor.split("+")):
        value = metrics.get(name)
        if not isinstance(value, (int, float)):
            names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise IFNetError(f"eval.monitor: no validation metric {name!r}; available: {', '.join(names)}")
        total += float(value)
    return total


def weights_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of all parameters (equal on every DDP rank when replicas agree)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += float(p.detach().double().abs().sum()) * (1 + 1e-3 * (i % 97))
    return total


def mean_auc(truth: np.ndarray, probs: np.ndarray) -> float:
    """Mean ROC AUC over the observations that have both classes in ``truth`` [N, 14] (NaN if none)."""
    aucs = []
    for j in range(truth.shape[1]):
        y, p = truth[:, j], probs[:, j]
        pos, neg = p[y > 0.5], p[y <= 0.5]
        if len(pos) and len(neg):
            # Mann-Whitney U statistic: probability a random positive outranks a random negative.
            greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
            aucs.append(greater / (len(pos) * len(neg)))
    return float(np.mean(aucs)) if aucs else math.nan
