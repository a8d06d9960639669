"""R2Gen-compatible report cleaning and a vocabulary that travels with the model.

The cleaning functions reproduce R2Gen's ``clean_report_iu_xray`` / ``clean_report_mimic_cxr``
character for character (including its regular expression, whose ``:-\\[`` is a character *range*
from ':' to '['), because BLEU/METEOR/CIDEr are computed on cleaned text: a different cleaning
makes our numbers incomparable with every published IU-Xray / MIMIC-CXR table.

Unlike R2Gen (where pad, bos and eos are all id 0) the vocabulary has four distinct special ids.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ifnet.errors import DataError
from ifnet.io_utils import PathLike, atomic_write_json, read_json

VOCAB_FORMAT = "ifnet-vocab"
VOCAB_VERSION = 1

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
#: Tokens a decoder never writes: padding, the start token, and <unk> (a report must say a word, not that one
#: was rare in training; banning it lets the model say its next best word instead).
NEVER_GENERATED = (PAD_ID, BOS_ID, UNK_ID)

# R2Gen's sentence-level character filter, verbatim semantics (see module docstring).
_SENT_STRIP = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _clean_sentence(sentence: str) -> str:
    s = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _SENT_STRIP.sub("", s)


def _join_sentences(sentences: Iterable[str]) -> str:
    # R2Gen filters with `!= []`, which never drops anything (a str is never a list), so empty
    # sentences stay and appear as a lone '.'; we keep that quirk for identical scoring.
    return " . ".join(_clean_sentence(s) for s in sentences) + " ."


def _collapse(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _split_numbered(text: str) -> list[str]:
    for old, new in (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                     (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". ")):
        text = text.replace(old, new)
    return text.strip().lower().split(". ")


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU-Xray cleaning: lower-case, sentences joined by ' . ', punctuation removed."""
    return _join_sentences(_split_numbered(_collapse(report, "..", ".", 3)))


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's MIMIC-CXR cleaning (also folds newlines, runs of '_' and double spaces)."""
    text = report.replace("\n", " ")
    text = _collapse(text, "__", "_", 7)
    text = _collapse(text, "  ", " ", 6)
    text = _collapse(text, "..", ".", 8)
    return _join_sentences(_split_numbered(text))


CLEANERS: Mapping[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
}


def get_cleaner(name: str) -> Callable[[str], str]:
    try:
        return CLEANERS[name]
    except KeyError:
        raise ValueError(f"unknown report cleaner {name!r}; choose from {sorted(CLEANERS)}") from None


@dataclass
class Tokenizer:
    """Word-level vocabulary over cleaned reports, with distinct pad/bos/eos/unk ids."""

    tokens: list[str]
    cleaner: str = "iu_xray"
    threshold: int = 3

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self._clean = get_cleaner(self.cleaner)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, reports: Iterable[str], cleaner: str = "iu_xray", threshold: int = 3) -> "Tokenizer":
        """Vocabulary of the words seen at least ``threshold`` times in ``reports`` (the train split)."""
        clean = get_cleaner(cleaner)
        counts: Counter[str] = Counter()
        for report in reports:
            counts.update(clean(report).split())
        words = sorted(w for w, c in counts.items() if c >= threshold and w not in SPECIAL_TOKENS)
        return cls(list(SPECIAL_TOKENS) + words, cleaner=cleaner, threshold=threshold)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "cleaner": self.cleaner,
                "threshold": self.threshold, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: Mapping, source: PathLike = "<vocabulary>") -> "Tokenizer":
        if not isinstance(data, Mapping) or data.get("format") != VOCAB_FORMAT:
            raise DataError(source, f"not an ifnet vocabulary (expected \"format\": \"{VOCAB_FORMAT}\")",
                            field="format")
        if data.get("version") != VOCAB_VERSION:
            raise DataError(source, f"unsupported vocabulary version {data.get('version')!r}", field="version")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(source, "must be a list of strings", field="tokens")
        try:
            threshold = int(data.get("threshold", 3))
        except (TypeError, ValueError):
            raise DataError(source, f"must be an integer, got {data.get('threshold')!r}", field="threshold") from None
        try:
            return cls(tokens, cleaner=str(data.get("cleaner", "iu_xray")), threshold=threshold)
        except ValueError as e:
            raise DataError(source, str(e), field="tokens") from None

    def save(self, path: PathLike) -> None:
        atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        return cls.from_dict(read_json(path), source=path)

    # -- use ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def clean(self, report: str) -> str:
        return self._clean(report)

    def encode(self, report: str, max_tokens: int | None = None) -> list[int]:
        """``[bos] + word ids + [eos]``; at most ``max_tokens`` word ids are kept (eos always ends)."""
        words = self._clean(report).split()
        if max_tokens is not None:
            words = words[:max_tokens]
        return [BOS_ID] + [self.token_to_id.get(w, UNK_ID) for w in words] + [EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first eos, skipping pad/bos, joined by spaces (R2Gen's decode)."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


def load_or_build(path: Path, reports: Iterable[str], cleaner: str, threshold: int) -> Tokenizer:
    """Load ``path`` if it exists, otherwise build from ``reports`` and save it there."""
    if Path(path).exists():
        return Tokenizer.load(path)
    tok = Tokenizer.build(reports, cleaner=cleaner, threshold=threshold)
    tok.save(path)
    return tok
