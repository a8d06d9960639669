"""The training run's config: one typed dataclass per component, nested (see ifnet/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ifnet.config import SettingError
from ifnet.data.transforms import IEC_MODES
from ifnet.decoding.guidance import valid_weight
from ifnet.metrics.clinical import UNCERTAIN_MAPPINGS
from ifnet.models.ifnet import IFNetConfig
from ifnet.train.ema import decay_problem


@dataclass
class DataConfig:
    annotation: str = ""  # R2Gen-format annotation.json
    image_root: str = ""  # folder the annotation's image_path entries are relative to
    labels: Optional[str] = None  # 14-label JSON for train/val; studies without one are labelled by the offline labeler
    # 14-label JSON the label head alone learns, when it should differ from the condition the decoder is
    # trained with (e.g. labels of the section the images show); studies without an entry use data.labels
    head_labels: Optional[str] = None
    cleaner: str = "iu_xray"  # R2Gen report cleaning: iu_xray or mimic_cxr (scores compare with papers only if it matches)
    vocab_threshold: int = 3  # words seen fewer times in train become <unk> (R2Gen: 3 IU-Xray, 10 MIMIC-CXR)
    max_tokens: int = 60  # words kept per training report (R2Gen's max_seq_length)
    image_size: int = 224  # network input side; the patch grid follows (7x7 at 224 for stride-32 CNNs)
    max_views: int = 2  # views per study (IU-Xray: frontal + lateral; MIMIC-CXR: 1 or more)
    iec: str = "none"  # on-the-fly enhancement: none, clahe or adaptive (identical to `ifnet enhance`)
    clip_limit: float = 1.7  # CLAHE clip limit (the paper's value)
    tile_grid: int = 8  # CLAHE tiles per side
    train_augment: bool = True  # random resized crop / small affine on train images (no flip: heart side matters)
    batch_size: int = 16  # studies per optimisation step (per process under torchrun)
    num_workers: int = 2  # DataLoader worker processes
    val_limit: Optional[int] = None  # only the first N validation studies (decoded each epoch, thresholds; None: all)
    # train on the first N training studies only (a smoke run, a learning curve; None: all). The vocabulary
    # is built from them
    train_limit: Optional[int] = None
    # repeat-factor sampling (LVIS): a study with a finding present in a fraction f < repeat_threshold of
    # the training studies is drawn sqrt(repeat_threshold / f) times per epoch on average; None = plain shuffle
    repeat_threshold: Optional[float] = None
    # with repeat_threshold: weight each study's label loss by 1 / its repeat factor, so the label head
    # learns the training prevalence while the decoder sees rare findings more often
    repeat_reweight_labels: bool = False

    def __post_init__(self) -> None:
        _at_least(self, ("vocab_threshold", "max_tokens", "image_size", "max_views", "batch_size", "tile_grid"), 1)
        _at_least(self, ("num_workers",), 0)
        if self.iec not in IEC_MODES:
            raise SettingError("iec", f"must be one of {', '.join(IEC_MODES)}, got {self.iec!r}")
        if not self.clip_limit > 0:
            raise SettingError("clip_limit", f"must be > 0, got {self.clip_limit}")
        for name in ("val_limit", "train_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1 or null (all), got {getattr(self, name)}")
        if self.repeat_threshold is None:
            if self.repeat_reweight_labels:
                raise SettingError("repeat_reweight_labels", "needs data.repeat_threshold (repeat-factor sampling)")
        elif not self.repeat_threshold > 0:
            raise SettingError("repeat_threshold", f"must be > 0 or null (plain shuffle), got {self.repeat_threshold}")


@dataclass
class OptimConfig:
    epochs: int = 30  # the paper's IU-Xray setting
    lr_visual: float = 1e-3  # learning rate of the CNN extractor (paper)
    lr_rest: float = 2e-3  # learning rate of everything else (paper)
    weight_decay: float = 5e-5  # Adam weight decay (R2Gen)
    amsgrad: bool = True  # R2Gen uses AMSGrad
    step_size: int = 10  # StepLR period in epochs (paper)
    gamma: float = 0.8  # StepLR decay (paper)
    grad_clip: float = 0.1  # max gradient norm (R2Gen hard-codes 0.1; here it is a setting)
    # share of each target word's probability spread over the vocabulary in the training report loss (0 = none;
    # the validation loss stays plain cross-entropy)
    report_label_smoothing: float = 0.0
    label_loss_weight: float = 1.0  # weight of the 14-label BCE beside the report cross-entropy
    # learning-rate multiplier for the parameters that carry the label condition (condition embedding,
    # label->vocabulary bias, label->memory-slot bias): Adam moves each weight by about lr per step, so at
    # lr 1e-3 a zero-initialised logit bias needs thousands of steps to matter; the CPU budget has hundreds
    condition_lr_scale: float = 1.0
    label_forcing: float = 1.0  # memory conditioned on text labels (1) vs predicted probabilities (0) in training
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    # validate and save an exponential moving average of the weights (ifnet.train.ema; bias-corrected, so it
    # averages about the last 1 / (1 - ema_decay) steps); None = the weights as trained
    ema_decay: Optional[float] = None
    max_bad_steps: int = 20  # consecutive non-finite losses/gradients before training stops

    def __post_init__(self) -> None:
        _at_least(self, ("epochs", "step_size", "max_bad_steps"), 1)
        for name in ("lr_visual", "lr_rest", "gamma", "grad_clip", "condition_lr_scale"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "label_loss_weight"):
            if not getattr(self, name) >= 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_forcing <= 1.0:
            raise SettingError("label_forcing", f"must be in [0, 1], got {self.label_forcing}")
        if not 0.0 <= self.report_label_smoothing < 1.0:
            raise SettingError("report_label_smoothing", f"must be in [0, 1), got {self.report_label_smoothing}")
        problem = decay_problem(self.ema_decay)
        if problem:
            raise SettingError("ema_decay", problem)


@dataclass
class EvalConfig:
    beam_size: int = 3  # beam width when decoding validation/test reports (paper: 3)
    max_len: int = 60  # longest generated report in tokens (IU-Xray 60, MIMIC-CXR 100)
    # condition guidance weight for validation, evaluate, generate, serve and export (ifnet.decoding.guidance);
    # 0 = plain beam search
    guidance: float = 0.0
    # findings-preserving minimum Bayes-risk decoding (ifnet.decoding.mbr) over this many samples per study,
    # for validation, evaluate and generate; 0 = the beam's best report. Costs 4-9x a beam-3 decode at 32
    mbr_samples: int = 0
    # validation metric for model selection (higher is better); "A+B" sums metrics, e.g. BLEU_4+CE_F1_macro
    # so that a template that scores BLEU but says nothing about the image is not what gets kept
    monitor: str = "BLEU_4"
    # validation decodes each half of the validation studies with label thresholds chosen on the other half,
    # so the CE that selects the epoch is not scored on the studies its thresholds were fitted to (the
    # checkpoint still keeps the thresholds chosen on the whole split); off: one choice for all
    crossfit_thresholds: bool = False
    patience: int = 50  # epochs without validation improvement before early stopping
    uncertain: str = "positive"  # CE mapping of the labeler's 'uncertain' (printed beside CE numbers)
    meteor: bool = True  # METEOR needs Java; off skips it (the key is then absent)

    def __post_init__(self) -> None:
        _at_least(self, ("beam_size", "max_len", "patience"), 1)
        _at_least(self, ("mbr_samples",), 0)
        if not valid_weight(self.guidance):
            raise SettingError("guidance", f"must be a finite number >= 0 (0: plain beam search), got {self.guidance}")
        if self.uncertain not in UNCERTAIN_MAPPINGS:
            raise SettingError("uncertain", f"must be one of {', '.join(UNCERTAIN_MAPPINGS)}, got {self.uncertain!r}")


@dataclass
class TrainConfig:
    seed: int = 9223  # R2Gen's seed; every random draw derives from it (offset by rank under torchrun)
    deterministic: bool = False  # deterministic torch kernels (bit-reproducible CPU runs, slower)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1 ...
    cache_features: bool = False  # with a frozen extractor: compute CNN features once and train on the cache
    model: IFNetConfig = field(default_factory=IFNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.device != "auto" and not is_torch_device(self.device):
            raise SettingError("device", f"must be auto or a torch device (cpu, cuda, cuda:1, mps ...), "
                                         f"got {self.device!r}")


def is_torch_device(name: str) -> bool:
    """Whether torch reads ``name`` as a device ("cpu", "cuda:1", ...; not "auto", which is ours)."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _at_least(cfg: object, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < low:
            raise SettingError(name, f"must be >= {low}, got {value}")


#: Config fields that name files or folders: stored absolute in a run's config.json, so evaluate, generate,
#: serve and export find them from any working directory.
PATH_FIELDS = (("data", "annotation"), ("data", "image_root"), ("data", "labels"), ("data", "head_labels"),
               ("model", "weights_path"))


def with_absolute_paths(cfg: "TrainConfig") -> "TrainConfig":
    """``cfg`` with every path of PATH_FIELDS made absolute against the current directory, by joining and not
    normalising: a symlink the user chose stays the path recorded, and ``link/../x`` keeps meaning what the
    operating system makes of it. Empty and unset paths stay as they are."""
    import os
    from dataclasses import replace

    sections = {}
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if value:
            sections.setdefault(section, {})[name] = os.path.join(os.getcwd(), os.path.expanduser(str(value)))
    return replace(cfg, **{section: replace(getattr(cfg, section), **fields) for section, fields in sections.items()})
