"""Agreement between two labelers, and the IU-Xray report sections that reference labels were made from.

``labels_14.json`` (the CheXbert labels of IU-Xray that the RRG literature uses for clinical
efficacy) was made by running CheXbert on the IMPRESSION section of each OpenI report, while the
R2Gen ``annotation.json`` "report" is the FINDINGS section. A labeler must therefore be compared
with those labels on the impression text (``load_openi_sections``); comparing on findings measures
the difference between the two sections, not the labeler. docs/LABELER.md shows both.
"""

from __future__ import annotations

import html
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Union

import numpy as np

from ifnet.errors import DataError
from ifnet.labels import FINDINGS, NO_FINDING_INDEX, OBSERVATIONS

_SECTION = re.compile(r'<AbstractText Label="(FINDINGS|IMPRESSION)"\s*(?:/>|>(.*?)</AbstractText>)', re.S)
_IMAGE = re.compile(r'<parentImage id="([^"]+)"')


@dataclass(frozen=True)
class ClassScore:
    """Precision, recall and F1 of one observation (positive class = 1)."""

    name: str
    support: int
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _score(name: str, truth: np.ndarray, pred: np.ndarray) -> ClassScore:
    truth, pred = truth.astype(bool), pred.astype(bool)
    return ClassScore(name, int(truth.sum()), int((truth & pred).sum()), int((~truth & pred).sum()),
                      int((truth & ~pred).sum()))


def per_class_scores(truth: np.ndarray, pred: np.ndarray) -> List[ClassScore]:
    """Scores for each of the 14 columns of binary ``[N, 14]`` arrays."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim != 2 or truth.shape[1] != len(OBSERVATIONS):
        raise ValueError(f"expected two [N, {len(OBSERVATIONS)}] arrays, got {truth.shape} and {pred.shape}")
    return [_score(name, truth[:, j], pred[:, j]) for j, name in enumerate(OBSERVATIONS)]


def micro_findings(truth: np.ndarray, pred: np.ndarray) -> ClassScore:
    """Micro-averaged score over the 13 findings (all but No Finding), pooled over studies."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    keep = [j for j in range(len(OBSERVATIONS)) if j != NO_FINDING_INDEX]
    return _score(f"micro ({len(FINDINGS)} findings)", truth[:, keep].ravel(), pred[:, keep].ravel())


def load_openi_sections(tgz: Union[str, Path]) -> Dict[str, Dict[str, str]]:
    """Image id (``CXR1_1_IM-0001-3001``) -> ``{"findings": ..., "impression": ...}`` from the OpenI tgz.

    Reads the archive in place (members ``ecgen-radiology/*.xml``); an empty section is "".
    """
    path = Path(tgz)
    if not path.is_file():
        raise DataError(path, "file not found (the OpenI NLMCXR_reports.tgz)")
    out: Dict[str, Dict[str, str]] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                xml = handle.read().decode("utf-8", errors="replace")
                sections = {"findings": "", "impression": ""}
                for label, body in _SECTION.findall(xml):
                    sections[label.lower()] = html.unescape(body or "").strip()
                for image in _IMAGE.findall(xml):
                    out[image] = sections
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(path, f"cannot read as a .tgz archive ({e})") from None
    return out


def sections_for_studies(sections: Mapping[str, Mapping[str, str]], study_ids: Iterable[str],
                         section: str) -> List[str]:
    """The ``section`` text of each R2Gen study id (an image-id prefix such as ``CXR2384_IM-0942``)."""
    by_study: Dict[str, str] = {}
    for image, parts in sections.items():
        # R2Gen ids are the image id without its last "-NNNN" part (or the whole id).
        stem = image.rsplit("-", 1)[0]
        by_study.setdefault(stem, parts[section])
        by_study.setdefault(image, parts[section])
    texts = []
    for study in study_ids:
        if study not in by_study:
            raise KeyError(f"study {study!r} not found in the OpenI reports")
        texts.append(by_study[study])
    return texts


def format_table(rows: Sequence[ClassScore]) -> str:
    """A Markdown table of support, precision, recall and F1."""
    lines = ["| observation | support | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.support} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |")
    return "\n".join(lines)
