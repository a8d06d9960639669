"""Report text normalisation and sentence splitting for the rule labeler.

Reports come from three places: raw IU-Xray / MIMIC text (mixed case, commas, "XXXX"
anonymisation tokens), R2Gen-cleaned model output ("the heart is normal . lungs are clear ."),
and whatever users paste (curly quotes, non-breaking spaces, full-width characters, dashes).
Everything is mapped to one lowercase ASCII-punctuated form so the phrase and cue patterns
only have to be written once.
"""

from __future__ import annotations

import re
import unicodedata
from typing import List

# NFKC already folds full-width letters, ligatures and non-breaking spaces; these are the
# punctuation marks it leaves alone that would otherwise break word and clause patterns.
_PUNCT_MAP = str.maketrans({
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u2212": "-",
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2022": ".", "\u00b7": " ",
    "\t": " ", "\r": "\n", "\u2028": "\n", "\u2029": "\n",
})

# A sentence is a run of text up to ".", "!", "?" or a newline; a period between two digits
# ("2.1 cm") or of an abbreviation ("vs.", "e.g.", "i.e.", "approx.") does not end it. A trailing "?"
# stays in the sentence because it is an uncertainty cue ("pneumonia?"); empty pieces from runs such as
# ".." (common in IU-Xray) are dropped.
_ABBREVIATION_DOT = r"(?i:(?<=\bvs)\.|(?<=\bapprox)\.|(?<=\be)\.(?=g\.)|(?<=\be\.g)\.|(?<=\bi)\.(?=e\.)|(?<=\bi\.e)\.)"
_SENTENCE = re.compile(r"(?:[^.!?\n]|(?<=\d)\.(?=\d)|" + _ABBREVIATION_DOT + r")+\??")
# A hard-wrapped line (MIMIC-CXR reports break lines inside sentences at about 60-80 characters): a newline
# after a line of at least WRAP_WIDTH characters that does not end a sentence, before a line that starts in
# lower case, is a space ("there is no focal consolidation, pleural\n effusion"). A short line, a line that
# starts in upper case or one after ".", ":" or ";" stays a sentence of its own: reports written one finding
# per line ("no pneumothorax\nmoderate right effusion") are lists, not wrapped text.
WRAP_WIDTH = 40
_WRAP = re.compile(r"(?m)^([^\n]{%d,}[^.!?:;\n\s])[ ]*\n[ ]*(?=[a-z])" % (WRAP_WIDTH - 1))
_SPACES = re.compile(r"[ ]{2,}")


def normalize(text: str) -> str:
    """Unicode-normalise and map punctuation to ASCII, keeping the original letter case.

    The case is kept so that explanations can quote the report as written; matching is done on
    ``sentence.lower()``.
    """
    if not isinstance(text, str):
        raise TypeError(f"report text must be str, not {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").translate(_PUNCT_MAP)
    return _SPACES.sub(" ", _WRAP.sub(r"\1 ", text))


def split_sentences(text: str) -> List[str]:
    """Split normalised text into stripped, non-empty sentences (terminal punctuation dropped)."""
    pieces = (m.group(0).strip() for m in _SENTENCE.finditer(text))
    return [p for p in pieces if p and p != "?"]
