"""The offline rule labeler: phrases + negation/uncertainty scope -> 14 CheXpert codes.

Per report: normalise, split into sentences, find every mention of each finding, give each
mention a code from its context (:mod:`ifnet.labeler.context`), then aggregate per observation
the CheXpert way -- positive if any mention is positive, else uncertain if any is uncertain, else
negative if any is negative, else not mentioned (BLANK). No Finding is POSITIVE when none of the
findings other than Support Devices is positive or uncertain, and BLANK otherwise (CheXpert never
writes a negative No Finding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Pattern, Sequence, Tuple

import numpy as np

from ifnet.labeler.context import SentenceContext, analyse_sentence, negation_cue, uncertainty_cue
from ifnet.labeler.phrases import PHRASES, ObservationPhrases
from ifnet.labeler.text import normalize, split_sentences
from ifnet.labels import (BLANK, CODE_NAMES, FINDINGS, NEGATIVE, NO_FINDING_INDEX, NUM_OBSERVATIONS,
                          OBSERVATIONS, POSITIVE, UNCERTAIN)

#: Findings that do not stop No Finding from being positive (CheXpert: devices are not disease).
NO_FINDING_IGNORES: Tuple[str, ...] = ("Support Devices",)
# Aggregation precedence: a higher rank wins over the mentions already seen.
_RANK = {BLANK: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


def _compile(patterns: Sequence[str]) -> Optional[Pattern[str]]:
    if not patterns:
        return None
    ordered = sorted(patterns, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(?:" + "|".join(ordered) + r")(?![\w-])")


@dataclass(frozen=True)
class Mention:
    """One phrase of one observation in one sentence, and the code its context gives it.

    ``cue_kind`` is ``"pre-negation"``, ``"post-negation"``, ``"pre-uncertainty"``,
    ``"post-uncertainty"``, ``"normal"`` (a phrase that itself states normality) or None.
    """

    observation: str
    code: int
    phrase: str
    sentence: str
    sentence_index: int
    cue: Optional[str] = None
    cue_kind: Optional[str] = None


@dataclass(frozen=True)
class ObservationExplanation:
    """Why one observation got its code: the deciding mention and every mention seen."""

    observation: str
    code: int
    reason: str
    deciding: Optional[Mention]
    mentions: Tuple[Mention, ...]

    @property
    def code_name(self) -> str:
        return CODE_NAMES[self.code]


@dataclass(frozen=True)
class Explanation:
    """The labels of one report with, per observation, the evidence behind them."""

    text: str
    codes: np.ndarray
    observations: Tuple[ObservationExplanation, ...]

    def __getitem__(self, name: str) -> ObservationExplanation:
        return self.observations[OBSERVATIONS.index(name)]

    def __iter__(self) -> Iterator[ObservationExplanation]:
        return iter(self.observations)

    def format(self, *, only_mentioned: bool = False) -> str:
        """A plain-text table: observation, label, and the phrase / cue / sentence behind it."""
        rows = []
        for item in self.observations:
            if only_mentioned and item.code == BLANK:
                continue
            rows.append(f"{item.observation:<27} {item.code_name:<14} {item.reason}")
        return "\n".join(rows)


class _CompiledObservation:
    """The compiled phrase lists of one finding."""

    __slots__ = ("name", "mentions", "normal", "exclude")

    def __init__(self, name: str, phrases: ObservationPhrases) -> None:
        self.name = name
        self.mentions = _compile(phrases.mentions)
        self.normal = _compile(phrases.normal)
        self.exclude = _compile(phrases.exclude)

    def find(self, sentence: str) -> List[Tuple[int, int, str, bool]]:
        """(start, end, phrase, is_normal_statement) for each mention in a lowercased sentence."""
        found: List[Tuple[int, int, str, bool]] = []
        normal_spans: List[Tuple[int, int]] = []
        if self.normal is not None:
            for m in self.normal.finditer(sentence):
                normal_spans.append(m.span())
                found.append((m.start(), m.end(), m.group(0), True))
        if self.mentions is None:
            return found
        excluded: Optional[List[Tuple[int, int]]] = None
        for m in self.mentions.finditer(sentence):
            if excluded is None:  # exclusions are looked for only once a mention is found
                excluded = normal_spans + ([x.span() for x in self.exclude.finditer(sentence)]
                                           if self.exclude is not None else [])
            s, e = m.span()
            if any(s < x1 and x0 < e for x0, x1 in excluded):
                continue
            found.append((s, e, m.group(0), False))
        return found


class Labeler:
    """CheXpert-style rule labeler. Immutable after construction, so one instance is thread-safe.

    ``phrases`` replaces the built-in phrase table (keys are finding names; missing findings are
    never mentioned), which is how a user adapts the labeler to another reporting style.
    """

    def __init__(self, phrases: Optional[Mapping[str, ObservationPhrases]] = None) -> None:
        table = PHRASES if phrases is None else phrases
        unknown = sorted(set(table) - set(FINDINGS))
        if unknown:
            raise ValueError(f"unknown observation(s) in phrase table: {unknown}; expected names from {FINDINGS}")
        self._observations = tuple(
            (OBSERVATIONS.index(name), _CompiledObservation(name, table[name])) for name in FINDINGS if name in table
        )
        self._no_finding_blockers = tuple(i for i, name in enumerate(FINDINGS) if name not in NO_FINDING_IGNORES)

    # -- core ---------------------------------------------------------------------------------
    def mentions(self, text: str) -> List[Mention]:
        """Every mention in ``text`` with its context code, in reading order."""
        out: List[Mention] = []
        for index, sentence in enumerate(split_sentences(normalize(text))):
            lowered = sentence.lower()
            ctx: Optional[SentenceContext] = None
            for _, obs in self._observations:
                for start, end, phrase, is_normal in obs.find(lowered):
                    if ctx is None:  # cue search only for sentences that mention something
                        ctx = analyse_sentence(lowered)
                    out.append(self._judge(obs.name, ctx, start, end, phrase, is_normal, sentence, index))
        return out

    @staticmethod
    def _judge(name: str, ctx: SentenceContext, start: int, end: int, phrase: str, is_normal: bool,
               sentence: str, index: int) -> Mention:
        if is_normal:
            return Mention(name, NEGATIVE, phrase, sentence, index, phrase, "normal")
        cue = negation_cue(ctx, start, end)
        if cue is not None:
            return Mention(name, NEGATIVE, phrase, sentence, index, cue.text, cue.kind)
        cue = uncertainty_cue(ctx, start, end)
        if cue is not None:
            return Mention(name, UNCERTAIN, phrase, sentence, index, cue.text, cue.kind)
        return Mention(name, POSITIVE, phrase, sentence, index)

    def _aggregate(self, mentions: Sequence[Mention]) -> Tuple[np.ndarray, Dict[int, Mention]]:
        codes = np.full(NUM_OBSERVATIONS, BLANK, dtype=np.int8)
        deciding: Dict[int, Mention] = {}
        for mention in mentions:
            i = OBSERVATIONS.index(mention.observation)
            if _RANK[mention.code] > _RANK[int(codes[i])]:
                codes[i] = mention.code
                deciding[i] = mention
        blocked = any(codes[i] in (POSITIVE, UNCERTAIN) for i in self._no_finding_blockers)
        codes[NO_FINDING_INDEX] = BLANK if blocked else POSITIVE
        return codes, deciding

    # -- public API ---------------------------------------------------------------------------
    def label(self, text: str) -> np.ndarray:
        """CheXpert codes ``int8[14]`` for one report, columns in ``OBSERVATIONS`` order."""
        return self._aggregate(self.mentions(text))[0]

    def label_batch(self, texts: Sequence[str]) -> np.ndarray:
        """CheXpert codes ``int8[N, 14]`` for N reports."""
        if isinstance(texts, str):
            raise TypeError("label_batch expects a sequence of reports, not one string; use label()")
        out = np.empty((len(texts), NUM_OBSERVATIONS), dtype=np.int8)
        for row, text in enumerate(texts):
            out[row] = self.label(text)
        return out

    def explain(self, text: str) -> Explanation:
        """Labels plus, per observation, the phrase, sentence and cue that decided it."""
        mentions = self.mentions(text)
        codes, deciding = self._aggregate(mentions)
        items = []
        for i, name in enumerate(OBSERVATIONS):
            own = tuple(m for m in mentions if m.observation == name)
            if i == NO_FINDING_INDEX:
                reason = self._no_finding_reason(codes, deciding)
                items.append(ObservationExplanation(name, int(codes[i]), reason, None, ()))
                continue
            mention = deciding.get(i)
            items.append(ObservationExplanation(name, int(codes[i]), _reason(mention), mention, own))
        return Explanation(text, codes, tuple(items))

    def _no_finding_reason(self, codes: np.ndarray, deciding: Dict[int, Mention]) -> str:
        blockers = [FINDINGS[i] for i in self._no_finding_blockers if codes[i] in (POSITIVE, UNCERTAIN)]
        if not blockers:
            return "no finding other than Support Devices is positive or uncertain"
        first = deciding[OBSERVATIONS.index(blockers[0])]
        return f"blocked by {', '.join(blockers)} ('{first.phrase}' in \"{first.sentence}\")"


def _reason(mention: Optional[Mention]) -> str:
    if mention is None:
        return "no mention"
    if mention.cue_kind is None:
        return f"'{mention.phrase}' in \"{mention.sentence}\""
    if mention.cue_kind == "normal":
        return f"'{mention.phrase}' states normal, in \"{mention.sentence}\""
    return f"'{mention.phrase}' with {mention.cue_kind} cue '{mention.cue}' in \"{mention.sentence}\""
