"""Adapter for a user's local CheXbert checkpoint (Smit et al., EMNLP 2020).

CheXbert is a BERT-base encoder with 14 linear heads on the [CLS] state: 13 heads with four
classes (blank, positive, negative, uncertain) and one two-class head for No Finding (blank,
positive). Its released ``chexbert.pth`` holds ``{"model_state_dict": ...}`` saved from a
``DataParallel`` model, so every key starts with ``module.``.

Nothing is downloaded: the user gives the checkpoint and a local BERT directory
(``bert-base-uncased`` with ``config.json`` and ``vocab.txt``) for the architecture and the
tokenizer; the encoder weights come from the checkpoint. ``transformers`` is an optional
dependency (``pip install 'ifnet[chexbert]'``), imported only here and only when loading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Union

import numpy as np

from ifnet.errors import IFNetError
from ifnet.labels import BLANK, NEGATIVE, NUM_OBSERVATIONS, POSITIVE, UNCERTAIN

if TYPE_CHECKING:  # torch is imported lazily so `import ifnet.labeler` stays light
    import torch

PathLike = Union[str, "os.PathLike[str]"]

#: CheXbert class index -> CheXpert code, for the 13 four-class heads and the No Finding head.
FINDING_CLASS_TO_CODE = (BLANK, POSITIVE, NEGATIVE, UNCERTAIN)
NO_FINDING_CLASS_TO_CODE = (BLANK, POSITIVE)
#: BERT's position limit; CheXbert truncates longer reports.
MAX_TOKENS = 512
# Buffers that older transformers versions saved in the state dict and newer ones do not keep.
_BENIGN_EXTRA_SUFFIXES = ("embeddings.position_ids",)


class CheXbertError(IFNetError):
    """The CheXbert adapter cannot run: a missing file, package or a checkpoint that does not fit."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CheXbertError(
            "the CheXbert labeler needs the optional package 'transformers', which is not installed; "
            "run: pip install 'ifnet[chexbert]'  (or use --labeler rules, which needs nothing)") from None
    return transformers


def _check_inputs(checkpoint: Path, bert_dir: Path) -> None:
    if not checkpoint.exists():
        raise CheXbertError(f"CheXbert checkpoint not found: {checkpoint} (pass the path of your local chexbert.pth)")
    if not checkpoint.is_file():
        raise CheXbertError(f"CheXbert checkpoint is not a file: {checkpoint}")
    if not bert_dir.is_dir():
        raise CheXbertError(
            f"BERT directory not found: {bert_dir} (a local copy of bert-base-uncased with config.json and vocab.txt)")
    missing = [name for name in ("config.json", "vocab.txt") if not (bert_dir / name).is_file()]
    if missing:
        raise CheXbertError(f"BERT directory {bert_dir} lacks {', '.join(missing)}")


def _model_state_dict(obj: Any, checkpoint: Path) -> Dict[str, "torch.Tensor"]:
    """The model weights inside a loaded checkpoint, without the DataParallel ``module.`` prefix."""
    import torch

    state = obj.get("model_state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheXbertError(f"{checkpoint}: not a CheXbert checkpoint (expected a state dict under 'model_state_dict')")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _build_model(transformers: Any, bert_dir: Path) -> "torch.nn.Module":
    import torch
    from torch import nn

    class CheXbertModel(nn.Module):
        """Same module names as CheXbert's ``bert_labeler`` so its state dict loads as is."""

        def __init__(self) -> None:
            super().__init__()
            config = transformers.BertConfig.from_pretrained(str(bert_dir), local_files_only=True)
            # Architecture only: every encoder weight is overwritten by the checkpoint.
            self.bert = transformers.BertModel(config, add_pooling_layer=True)
            hidden = config.hidden_size
            heads = [nn.Linear(hidden, 4) for _ in range(NUM_OBSERVATIONS - 1)] + [nn.Linear(hidden, 2)]
            self.linear_heads = nn.ModuleList(heads)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> List[torch.Tensor]:
            """``input_ids[B, T]`` -> 14 logit tensors ``[B, 4]`` (the last ``[B, 2]``)."""
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            cls = hidden[:, 0, :]
            return [head(cls) for head in self.linear_heads]

    return CheXbertModel()


class CheXbertLabeler:
    """Labels reports with a loaded CheXbert model; same interface as the rule ``Labeler``."""

    def __init__(self, model: "torch.nn.Module", tokenizer: Any, device: str = "cpu", batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        # Longer reports are truncated, as CheXbert does; a smaller BERT config lowers the limit.
        positions = getattr(getattr(getattr(model, "bert", None), "config", None), "max_position_embeddings", MAX_TOKENS)
        self.max_tokens = min(MAX_TOKENS, int(positions))

    @staticmethod
    def _clean(text: str) -> str:
        # CheXbert's own preprocessing: one line, single spaces.
        return " ".join(str(text).split())

    def label(self, text: str) -> np.ndarray:
        """CheXpert codes ``int8[14]`` for one report."""
        return self.label_batch([text])[0]

    def label_batch(self, texts: Sequence[str]) -> np.ndarray:
        """CheXpert codes ``int8[N, 14]``, columns in ``OBSERVATIONS`` order."""
        import torch

        if isinstance(texts, str):
            raise TypeError("label_batch expects a sequence of reports, not one string; use label()")
        out = np.empty((len(texts), NUM_OBSERVATIONS), dtype=np.int8)
        for start in range(0, len(texts), self.batch_size):
            chunk = [self._clean(t) for t in texts[start:start + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            classes = [lg.argmax(dim=1).cpu().numpy() for lg in logits]
            for j, cls in enumerate(classes):
                table = NO_FINDING_CLASS_TO_CODE if j == NUM_OBSERVATIONS - 1 else FINDING_CLASS_TO_CODE
                out[start:start + len(chunk), j] = np.asarray(table, dtype=np.int8)[cls]
        return out


def load_chexbert(checkpoint: PathLike, bert_dir: PathLike, device: str = "cpu",
                  batch_size: int = 16) -> CheXbertLabeler:
    """Load a local CheXbert checkpoint; raise a one-line :class:`CheXbertError` naming what is missing.

    ``checkpoint``: the released ``chexbert.pth`` (a state dict, loaded with ``weights_only=True``
    so no pickled code runs). ``bert_dir``: local ``bert-base-uncased`` folder (config + vocab).
    """
    checkpoint, bert_dir = Path(checkpoint), Path(bert_dir)
    _check_inputs(checkpoint, bert_dir)
    transformers = _require_transformers()
    import torch

    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; the user needs one line
        raise CheXbertError(f"{checkpoint}: cannot be read as a weights-only PyTorch checkpoint "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    state = _model_state_dict(raw, checkpoint)
    try:
        model = _build_model(transformers, bert_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheXbertError(f"{bert_dir}: cannot build BERT from this directory ({_first_line(e)})") from None
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(_BENIGN_EXTRA_SUFFIXES)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheXbertError(
            f"{checkpoint}: does not match a CheXbert model built from {bert_dir} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatch: e.g. a BERT config of another size
        last = str(e).strip().splitlines()[-1].strip()
        raise CheXbertError(f"{checkpoint}: weights do not fit the BERT config in {bert_dir}: {last}") from None
    return CheXbertLabeler(model.to(device), tokenizer, device=device, batch_size=batch_size)
