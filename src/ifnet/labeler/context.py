"""Negation and uncertainty cues with scope, in the spirit of NegEx / ConText.

A mention is judged only against cues in its own sentence, and only when no scope terminator
("but", "however", "which", a semicolon, a new "there is" clause ...) lies between cue and mention.

Cue kinds (checked in this order of precedence when they overlap):

* pseudo   -- look like negations but are not ("no change in", "not only"); they disable any
              negation cue they overlap, so "no interval change in the cardiomegaly" stays positive.
* uncertainty cues that contain a negation word ("cannot exclude", "not ruled out") disable the
  negation cue they overlap, so they read as uncertain and not negative.
* pre-negation  -- before the mention: "no", "without", "negative for", "free of", ...
* post-negation -- after the mention: "... is not seen", "... has resolved", ...
* pre-/post-uncertainty -- "possible", "may represent", "cannot exclude", "... is suspected".

Negation wins over uncertainty for one mention ("no findings to suggest pneumonia" is negative),
as in the CheXpert labeler.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import List, Optional, Pattern, Sequence, Tuple

#: Words allowed between a pre-cue and its mention (lists: "no pneumonia, effusion, edema ...").
PRE_NEGATION_WINDOW = 14
PRE_UNCERTAINTY_WINDOW = 10
#: Post-cues reach back over a short list: "effusion and pneumothorax are not seen".
POST_NEGATION_WINDOW = 7
POST_UNCERTAINTY_WINDOW = 7

_WORD = re.compile(r"[^\W_]+")


def _alternation(patterns: Sequence[str], punctuation: str = "") -> Pattern[str]:
    """Whole-word alternation; ``punctuation`` (a character class body) matches without boundaries."""
    # Longest alternatives first so "no evidence of" wins over "no".
    ordered = sorted(patterns, key=len, reverse=True)
    words = r"(?<![\w-])(?:" + "|".join(ordered) + r")(?![\w-])"
    return re.compile(words + (r"|[" + punctuation + r"]" if punctuation else ""))


_BE = r"(?:is|are|was|were|has been|have been|had been|be|being)"
_SEEN = (r"(?:seen|identified|present|visualized|visualised|demonstrated|appreciated|evident|noted|"
         r"detected|observed|apparent|visible|shown|depicted)")

PSEUDO_NEGATION = _alternation([
    r"no (?:significant |substantial |appreciable |definite |radiographic |interval |major )*"
    r"(?:change|changes|increase|decrease|progression|difference|enlargement of the known)",
    r"not (?:significantly |substantially |markedly )?(?:changed|increased|decreased|progressed)",
    r"without (?:significant |interval )?(?:change|changes|progression|increase)",
    r"not only", r"no longer necessary", r"gram[- ]negative", r"not well (?:seen|visualized|evaluated|assessed)",
    r"not (?:entirely |completely |fully )?(?:excluded|ruled out)",
])

PRE_NEGATION = _alternation([
    r"no", r"not", r"without", r"absent", r"absence of", r"lack of", r"never", r"nor", r"neither",
    r"negative for", r"free of", r"clear of", r"free from", r"ruled out",
    r"no (?:radiographic |radiologic |definite |convincing |acute |suspicious )?(?:evidence|signs?|findings?)"
    r" (?:of|for|to suggest|suggestive of|suggesting)",
    r"resolution of", r"resolved", r"removal of", r"removed", r"interval removal of",
    r"cleared", r"clearing of", r"no longer", r"not seen", r"fails? to (?:show|demonstrate|reveal)",
    r"(?:did|does|do) not (?:show|demonstrate|reveal)", r"no visible", r"no visualized",
    r"no demonstrable",
])

#: Pre-negations that speak of one earlier finding or device ("resolution of the previously seen right lower lobe
#: consolidation", "removal of the right-sided PICC line"): their scope also stops at "with" or "new", so
#: "resolution of the effusion with new right lower lobe pneumonia" does not negate the pneumonia.
SHORT_REACH_NEGATION = re.compile(r"(?:interval )?(?:resolution of|resolved|removal of|removed|cleared|clearing of)")
SHORT_REACH_STOP = re.compile(r"(?<![\w-])(?:with|new)(?![\w-])")

POST_NEGATION = _alternation([
    _BE + r" (?:not|no longer) (?:(?:well|clearly|definitely|convincingly|readily) )?" + _SEEN,
    r"not " + _SEEN, r"no longer " + _SEEN,
    _BE + r" absent", r"absent", _BE + r" (?:resolved|removed|cleared|gone)", r"(?:has|have) (?:resolved|cleared)",
    r"resolved", r"(?:is|are|was|were) negative", _BE + r" ruled out", r"(?:is|are|was|were) excluded",
    r"(?:has|have) been (?:removed|withdrawn)",
    # "pleural effusion is unlikely": a low probability reads as a negative finding, as radiologists mean it
    # (a verb is required: in "atelectasis, less likely pneumonia" the cue looks forward, at the pneumonia)
    r"(?:is|are|was|were|seems?|appears?) (?:very |highly |felt to be |thought to be )?(?:unlikely|less likely)",
    r"unlikely(?=\s*(?:$|[.,;]))",  # "edema unlikely." ends its clause; "unlikely pneumonia" looks forward
])

#: Template answers after a colon or dash ("Pneumothorax: none.", "Pleural effusion - no"): a post-negation
#: whose match starts with the colon, so the colon (a scope terminator) does not cut it off. The answer must end
#: its clause: in "cardiomegaly - no pleural effusion" the "no" opens a new negated phrase.
TEMPLATE_NEGATION = re.compile(r"\s*[:-]\s*(?:none|no|negative|absent|not seen)(?=\s*(?:$|[.,;]))")

PRE_UNCERTAINTY = _alternation([
    r"possible", r"possibly", r"probable", r"probably", r"likely", r"most likely", r"presumed",
    r"presumably", r"questionable", r"question of", r"questioned", r"question", r"suspected",
    r"suspicious for", r"suspicious of", r"suspect", r"may", r"might", r"could", r"can not exclude",
    r"cannot exclude", r"can't exclude", r"cannot be excluded", r"not (?:entirely |completely |fully )?excluded",
    r"cannot rule out", r"can not rule out", r"cannot be ruled out", r"not (?:entirely |completely )?ruled out",
    r"rule out", r"r/o", r"suggest", r"suggests", r"suggestive of", r"suggesting", r"suggested",
    r"concerning for", r"concern for", r"worrisome for", r"differential(?: diagnosis)? (?:includes?|of)",
    r"versus", r"vs", r"equivocal", r"indeterminate", r"uncertain", r"borderline", r"atypical",
    r"raises? the (?:possibility|question) of", r"consider", r"considered", r"consideration of",
    r"may represent", r"could represent", r"which may", r"or", r"and/or", r"either",
    r"not definitely", r"not clearly",
    # clinical questions: "evaluate for pneumonia", "to exclude pneumothorax"
    r"evaluate for", r"evaluation for", r"assess for", r"assessment for", r"to exclude", r"exclude",
    r"unlikely",  # "unlikely pneumonia, more likely atelectasis": a doubt, not a denial, about what follows
], punctuation="?")

POST_UNCERTAINTY = _alternation([
    r"(?:is|are|was|were) (?:not )?(?:entirely |completely )?(?:excluded|ruled out)",
    r"cannot be (?:entirely |completely )?(?:excluded|ruled out)",
    r"(?:is|are) (?:suspected|possible|questioned|likely|questionable|not excluded)",
    r"versus", r"vs", r"or", r"and/or", r"(?:may|could|might) (?:be|represent)",
], punctuation="?")

# Scope ends at adversative conjunctions, relative clauses and a fresh "there is" clause, so
# "no effusion but there is atelectasis" does not negate the atelectasis.
TERMINATORS = _alternation([
    r"but", r"however", r"although", r"though", r"yet", r"except", r"aside from", r"apart from",
    r"other than", r"besides", r"whereas", r"while", r"which", r"nevertheless", r"still",
    r"with the exception of", r"there (?:is|are|has been|have been|was|were)",
    r"(?:is|are) (?:again )?(?:seen|noted|present|identified)",
], punctuation=";:")

#: A list item that starts with a size or course word after a comma or "and" begins a new, positive
#: statement: "no pneumothorax, small left effusion", "no pneumothorax and mild cardiomegaly". It ends a
#: negation's scope only: "possible atelectasis and minimal effusion" keeps both uncertain. ("large", "severe",
#: "marked", "new" and "residual" are left out: "no consolidation, large effusion, or pneumothorax" and "no
#: pneumothorax, new consolidation or effusion" are negated lists.)
LIST_BREAK = re.compile(r"(?:,\s*(?:and\s+)?|\s+and\s+)(?=(?:small|mild|mildly|moderate|moderately|trace|minimal|tiny|"
                        r"persistent|increased|increasing|worsening|worsened)(?![\w-]))")


@dataclass(frozen=True)
class Cue:
    """One cue occurrence in a lowercased sentence: ``kind`` is e.g. ``"pre-negation"``."""

    kind: str
    text: str
    start: int
    end: int


def _spans(pattern: Pattern[str], sentence: str, kind: str) -> List[Cue]:
    return [Cue(kind, m.group(0), m.start(), m.end()) for m in pattern.finditer(sentence)]


class Cues(tuple):
    """Cues of one kind in one sentence, in reading order (they do not overlap, so their ends are in
    order too), with their start and end offsets kept for bisection."""

    starts: Tuple[int, ...]
    ends: Tuple[int, ...]

    def __new__(cls, cues: Sequence[Cue]) -> "Cues":
        self = super().__new__(cls, sorted(cues, key=lambda c: c.start))
        self.starts = tuple(c.start for c in self)
        self.ends = tuple(c.end for c in self)
        return self


@dataclass(frozen=True)
class SentenceContext:
    """All cues and terminators of one lowercased sentence, found once and reused per mention."""

    pre_negation: Cues
    post_negation: Cues
    pre_uncertainty: Cues
    post_uncertainty: Cues
    terminators: Tuple[Tuple[int, int], ...]  # end every cue's scope
    negation_terminators: Tuple[Tuple[int, int], ...]  # the terminators plus list breaks: end a negation's scope
    word_starts: Tuple[int, ...]
    sentence: str


# Uncertainty cues that contain a negation word; they switch off the negation cue they overlap.
_NEGATED_UNCERTAINTY = re.compile(r"\b(?:not|cannot|can't|can not|no)\b")


def analyse_sentence(sentence: str) -> SentenceContext:
    """Find every cue in ``sentence`` (already lowercased) and resolve their overlaps."""
    pseudo = _spans(PSEUDO_NEGATION, sentence, "pseudo-negation")
    pre_unc = _spans(PRE_UNCERTAINTY, sentence, "pre-uncertainty")
    post_unc = _spans(POST_UNCERTAINTY, sentence, "post-uncertainty")
    blockers = pseudo + [c for c in pre_unc + post_unc if _NEGATED_UNCERTAINTY.search(c.text)]

    blockers.sort(key=lambda b: b.start)
    starts = [b.start for b in blockers]
    reach = list(accumulate((b.end for b in blockers), max))  # the furthest end among blockers[: i + 1]

    def keep(cues: List[Cue]) -> Cues:
        # a cue overlaps a blocker iff some blocker starting before the cue ends ends after the cue starts
        def free(c: Cue) -> bool:
            i = bisect_left(starts, c.end)
            return i == 0 or reach[i - 1] <= c.start

        return Cues([c for c in cues if free(c)])

    pre_neg = keep(_spans(PRE_NEGATION, sentence, "pre-negation"))
    post_neg = keep(_spans(POST_NEGATION, sentence, "post-negation")
                    + _spans(TEMPLATE_NEGATION, sentence, "post-negation"))
    # Uncertainty cues are all kept ("not excluded" reads as uncertain); a pseudo-negation such as
    # "no change" is a cue of neither kind.
    terms = tuple((m.start(), m.end()) for m in TERMINATORS.finditer(sentence))
    neg_terms = tuple(sorted(terms + tuple((m.start(), m.end()) for m in LIST_BREAK.finditer(sentence))))
    words = tuple(m.start() for m in _WORD.finditer(sentence))
    return SentenceContext(pre_neg, post_neg, Cues(pre_unc), Cues(post_unc), terms, neg_terms, words, sentence)



def _words_between(ctx: SentenceContext, start: int, end: int) -> int:
    return bisect_left(ctx.word_starts, end) - bisect_left(ctx.word_starts, start)


def _terminated(terminators: Tuple[Tuple[int, int], ...], start: int, end: int) -> bool:
    """Whether a terminator lies wholly inside ``[start, end)``. Terminators are sorted and do not
    overlap, so the first one starting at or after ``start`` is the only one to check."""
    i = bisect_left(terminators, (start, -1))
    return i < len(terminators) and terminators[i][1] <= end


def _pre_cue(cues: Cues, ctx: SentenceContext, start: int, window: int,
             terminators: Tuple[Tuple[int, int], ...]) -> Optional[Cue]:
    """The closest cue that ends before ``start``, if it reaches it. Cues of one kind do not overlap, so
    they are sorted by end as by start; a farther cue spans everything the closest one does (more words,
    every terminator), so when the closest does not reach the mention no cue does: one bisection per
    mention. The exception is a short-reach cue stopped by "with"/"new": it says nothing about the
    mention, so the next cue before it is judged instead ("no pneumothorax following removal of the
    chest tube or new effusion": the "no" still reaches the effusion)."""
    i = bisect_right(cues.ends, start) - 1
    while i >= 0 and SHORT_REACH_NEGATION.fullmatch(cues[i].text) \
            and SHORT_REACH_STOP.search(ctx.sentence, cues[i].end, start):
        i -= 1
    if i < 0:
        return None
    cue = cues[i]
    if _words_between(ctx, cue.end, start) > window or _terminated(terminators, cue.end, start):
        return None
    return cue


def _post_cue(cues: Cues, ctx: SentenceContext, end: int, window: int,
              terminators: Tuple[Tuple[int, int], ...]) -> Optional[Cue]:
    """The closest cue that starts after ``end``, if it reaches back to it. A pre-negation in between
    claims the cue for the negated phrase it opens: in "pneumonia without effusion or pneumothorax" the
    "or" joins the negated list and does not make the pneumonia uncertain."""
    i = bisect_left(cues.starts, end)
    if i == len(cues):
        return None
    cue = cues[i]
    if _words_between(ctx, end, cue.start) > window or _terminated(terminators, end, cue.start):
        return None
    negs = ctx.pre_negation
    j = bisect_left(negs.starts, end)
    if j < len(negs) and negs.ends[j] <= cue.start:
        return None
    return cue


def negation_cue(ctx: SentenceContext, start: int, end: int) -> Optional[Cue]:
    """The negation cue whose scope covers the mention at ``[start, end)``, if any."""
    return (_pre_cue(ctx.pre_negation, ctx, start, PRE_NEGATION_WINDOW, ctx.negation_terminators)
            or _post_cue(ctx.post_negation, ctx, end, POST_NEGATION_WINDOW, ctx.negation_terminators))


def uncertainty_cue(ctx: SentenceContext, start: int, end: int) -> Optional[Cue]:
    """The uncertainty cue whose scope covers the mention at ``[start, end)``, if any."""
    return (_pre_cue(ctx.pre_uncertainty, ctx, start, PRE_UNCERTAINTY_WINDOW, ctx.terminators)
            or _post_cue(ctx.post_uncertainty, ctx, end, POST_UNCERTAINTY_WINDOW, ctx.terminators))
