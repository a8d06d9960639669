"""Build an R2Gen-format IU-Xray annotation from the raw OpenI (or Kaggle) download.

R2Gen's ``annotation.json`` for IU-Xray (2069/296/590 studies) was published without the code that made
it. Studying it against the raw OpenI reports (``NLMCXR_reports.tgz``, 3,955 ``ecgen-radiology/*.xml``)
gives the rules this module reproduces; on that archive they give back every one of R2Gen's 2955 study
ids with the identical report text (``tests/test_openi.py`` checks this):

* **Study id** = the first image id of the study (image ids sorted; that is also their order in the
  XML) with its last ``-<digits>`` group removed: images ``CXR2384_IM-0942-1001``, ``...-3001`` give
  ``CXR2384_IM-0942``; ``CXR2056_IM-0694-1001-0001`` gives ``CXR2056_IM-0694-1001``.
* **Kept studies** = a non-empty FINDINGS section and at least two ``parentImage`` ids. R2Gen checked
  nothing about the views: a dozen of its studies have two frontal or two lateral images.
* **Report** = the FINDINGS ``AbstractText`` verbatim (only leading/trailing whitespace is stripped;
  inner spacing is kept, since R2Gen kept it). Cleaning happens later, in ``ifnet.data.tokenizer``.

Frontal/lateral. The OpenI XML has no view label, so two view rules exist (``views``):

* ``"order"`` (R2Gen's rule, the default without a projections table): view 0 and view 1 are the first
  two image ids in sorted order. By the Kaggle labels this is frontal-then-lateral for 2582 of R2Gen's
  2955 studies only; 313 are lateral-first and 58 hold two images of the same view.
* ``"projection"`` (the default when a Kaggle ``indiana_projections.csv`` is given): view 0 is the first
  image labelled Frontal, view 1 the first labelled Lateral; a study without both is skipped. XML image
  ids are matched to Kaggle file names by study number and the ``IM-...`` part
  (``CXR1_1_IM-0001-4001`` <-> ``1_IM-0001-4001.dcm.png``).

Image paths (``layout``), relative to the images folder, always two per study (view 0, view 1):

* ``"r2gen"``: ``<id>/0.png``, ``<id>/1.png`` -- R2Gen's image download (its 0/1 order is whatever that
  download holds; we cannot re-pair it). The default when no images folder is given, so the output
  equals R2Gen's file.
* ``"openi"``: the flat OpenI PNG folder, ``CXR1_1_IM-0001-4001.png``.
* ``"kaggle"``: the Kaggle ``images_normalized`` folder, ``1_IM-0001-4001.dcm.png``.

Given an images folder, its layout is detected from the names in it, and studies whose files are
missing are skipped with the missing paths as the reason.

Split: studies are ordered by ``sha256("<seed>:<id>")`` and cut into train/val/test by the fractions
(70/10/20 by default; counts rounded, test takes the remainder). It is deterministic on every platform
and Python version, and adding or removing one study moves at most a boundary study, never reshuffles
the rest. ``split_from`` instead reuses the split of an existing annotation (e.g. R2Gen's own).

Safety: the archive is streamed with :mod:`tarfile` (nothing is extracted to disk); a member with an
absolute or ``..`` path makes the whole archive refused. XML is parsed with :mod:`xml.etree` but any
``<!DOCTYPE`` (the only way to declare entities) is refused, so entity bombs and external entities
cannot be expressed.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Optional, Sequence, Union

from ifnet.errors import DataError, UsageError
from ifnet.io_utils import PathLike, read_json

SECTIONS = ("findings", "impression", "both")
LAYOUTS = ("r2gen", "openi", "kaggle")
VIEW_RULES = ("order", "projection")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
# A report XML is ~5 KB; anything far larger is not one (and must not be read into memory whole).
MAX_XML_BYTES = 4 * 1024 * 1024
FRONTAL, LATERAL = "Frontal", "Lateral"

_STUDY_SUFFIX = re.compile(r"-\d+$")
_UID = re.compile(r"CXR(\d+)")


@dataclass(frozen=True)
class Study:
    """One report with its images, as read from an XML or a Kaggle CSV row."""

    uid: str  # the OpenI study number: "2384" for CXR2384 (Kaggle's ``uid`` column)
    source: str  # where it came from, for messages: "reports.tgz[ecgen-radiology/2384.xml]"
    image_ids: tuple[str, ...]  # OpenI image ids, sorted: ("CXR2384_IM-0942-1001", ...)
    findings: str = ""
    impression: str = ""

    @property
    def study_id(self) -> str:
        """R2Gen's id (see module docstring); ``CXR<uid>`` for a study without images."""
        return study_id_from_image_id(self.image_ids[0]) if self.image_ids else f"CXR{self.uid}"


@dataclass(frozen=True)
class Skipped:
    """A study left out of the annotation, and why (``reason`` is a short fixed phrase to count by)."""

    study_id: str
    source: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ConvertOptions:
    """How to turn studies into an annotation; see the module docstring for each rule."""

    section: str = "findings"  # which report section becomes ``report``: findings | impression | both
    seed: int = 0  # split seed
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS  # train, val, test
    layout: str = "r2gen"  # image_path naming: r2gen | openi | kaggle
    views: str = "order"  # frontal/lateral rule: order | projection
    images_dir: Optional[Path] = None  # when set, studies with missing image files are skipped
    projections: Optional[Mapping[str, str]] = None  # Kaggle file name -> "Frontal" / "Lateral"
    split_from: Optional[Mapping[str, str]] = None  # study id -> split, overrides the seeded split

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise UsageError(f"unknown section {self.section!r}; choose from {', '.join(SECTIONS)}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown image layout {self.layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.views not in VIEW_RULES:
            raise UsageError(f"unknown view rule {self.views!r}; choose from {', '.join(VIEW_RULES)}")
        if self.views == "projection" and self.projections is None:
            raise UsageError("the 'projection' view rule needs a projections table (indiana_projections.csv)")
        check_fractions(self.fractions)
        if self.split_from is not None and not set(self.split_from.values()) <= set(SPLITS):
            raise UsageError(f"split_from maps study ids to splits other than {', '.join(SPLITS)}")


@dataclass
class Conversion:
    """The R2Gen-format annotation and the studies left out of it."""

    annotation: dict[str, list[dict]]
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {split: len(self.annotation[split]) for split in SPLITS}


# -- ids and names ------------------------------------------------------------------------------
def study_id_from_image_id(image_id: str) -> str:
    """``CXR2384_IM-0942-1001`` -> ``CXR2384_IM-0942`` (R2Gen's study id)."""
    return _STUDY_SUFFIX.sub("", image_id)


def kaggle_filename(uid: str, image_id: str) -> str:
    """The Kaggle file name of an OpenI image: ``(1, CXR1_1_IM-0001-4001)`` -> ``1_IM-0001-4001.dcm.png``.

    Matching on the ``IM-`` part (not on the whole id) because study 1's OpenI ids carry an extra ``_1``.
    """
    at = image_id.find("IM-")
    tail = image_id[at:] if at >= 0 else image_id.split("_", 1)[-1]
    return f"{uid}_{tail}.dcm.png"


# -- OpenI XML ----------------------------------------------------------------------------------
class _DoctypeRefused(Exception):
    pass


class _NoDoctypeBuilder(ET.TreeBuilder):
    """Tree builder that stops the parse at a DOCTYPE, before any entity in it is declared."""

    def doctype(self, name: str, pubid: Optional[str], system: Optional[str]) -> None:
        raise _DoctypeRefused(name)


def parse_openi_xml(data: bytes, source: str) -> Study:
    """Parse one OpenI report XML; malformed or unexpected XML is a DataError naming ``source``."""
    parser = ET.XMLParser(target=_NoDoctypeBuilder())
    try:
        parser.feed(data)
        root = parser.close()
    except _DoctypeRefused:
        raise DataError(source, "XML with a <!DOCTYPE> is refused (entities are not allowed)") from None
    except ET.ParseError as e:
        raise DataError(source, f"malformed XML: {e}") from None
    if root.tag != "eCitation":
        raise DataError(source, f"not an OpenI report: root element is <{root.tag}>, expected <eCitation>")
    uid_elem = root.find("uId")
    match = _UID.fullmatch((uid_elem.get("id") or "") if uid_elem is not None else "")
    if match is None:
        raise DataError(source, "missing or not of the form <uId id=\"CXR<number>\"/>", field="uId")
    sections: dict[str, list[str]] = {"FINDINGS": [], "IMPRESSION": []}
    for elem in root.iter("AbstractText"):
        label = (elem.get("Label") or "").upper()
        text = "".join(elem.itertext()).strip()
        if label in sections and text:
            sections[label].append(text)
    image_ids = []
    for elem in root.iter("parentImage"):
        image_id = (elem.get("id") or "").strip()
        if not image_id:
            raise DataError(source, "a <parentImage> has no id attribute", record=f"CXR{match.group(1)}",
                            field="parentImage")
        image_ids.append(image_id)
    return Study(uid=match.group(1), source=source, image_ids=tuple(sorted(set(image_ids))),
                 findings=" ".join(sections["FINDINGS"]), impression=" ".join(sections["IMPRESSION"]))


def _unsafe_member_name(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"[A-Za-z]:", name))


def _iter_archive(path: Path) -> Iterator[Study]:
    try:
        # "r|*" streams the members in order: nothing is extracted, nothing is seeked back to.
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if _unsafe_member_name(member.name):
                    raise DataError(path, f"archive member {member.name!r} has an absolute or '..' path; "
                                          "refusing the archive")
                if not member.isfile() or not member.name.lower().endswith(".xml"):
                    continue  # directories, links and non-report files carry no study
                source = f"{path}[{member.name}]"
                if member.size > MAX_XML_BYTES:
                    raise DataError(source, f"{member.size} bytes is too large for a report XML")
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                yield parse_openi_xml(handle.read(), source)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(path, f"cannot read the archive: {e}") from None


def _iter_xml_dir(path: Path) -> Iterator[Study]:
    files = sorted(path.glob("*.xml"))
    if not files and (path / "ecgen-radiology").is_dir():  # the folder the archive unpacks into
        files = sorted((path / "ecgen-radiology").glob("*.xml"))
    for file in files:
        if file.stat().st_size > MAX_XML_BYTES:
            raise DataError(file, f"{file.stat().st_size} bytes is too large for a report XML")
        yield parse_openi_xml(file.read_bytes(), str(file))


def read_openi_reports(path: PathLike) -> list[Study]:
    """Every study in an OpenI reports archive (``.tgz``/``.tar``), a folder of XMLs, or one XML file."""
    p = Path(path)
    if p.is_dir():
        studies = list(_iter_xml_dir(p))
    elif p.is_file() and p.suffix.lower() == ".xml":
        studies = [parse_openi_xml(p.read_bytes(), str(p))]
    elif p.is_file():
        if not tarfile.is_tarfile(p):
            raise DataError(p, "not a tar archive (.tgz/.tar), a folder of XMLs or an .xml file")
        studies = list(_iter_archive(p))
    else:
        raise DataError(p, "not found")
    if not studies:
        raise DataError(p, "no OpenI report XMLs (*.xml) found")
    return studies


# -- Kaggle CSVs --------------------------------------------------------------------------------
def _read_csv(path: PathLike, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (line number, row); a missing file or column is a DataError naming it."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, strict=True)  # an unterminated quote is an error, not one long field
            columns = reader.fieldnames or []
            for name in required:
                if name not in columns:
                    raise DataError(p, f"missing column (found: {', '.join(columns) or 'none'})", field=name)
            return [(reader.line_num, {k: (v or "") for k, v in row.items() if k is not None})
                    for row in reader]
    except FileNotFoundError:
        raise DataError(p, "file not found") from None
    except IsADirectoryError:
        raise DataError(p, "is a directory, expected a CSV file") from None
    except UnicodeDecodeError as e:
        raise DataError(p, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(p, f"malformed CSV: {e}") from None


def read_projections(path: PathLike) -> dict[str, str]:
    """Kaggle ``indiana_projections.csv``: image file name -> ``"Frontal"`` or ``"Lateral"``."""
    table: dict[str, str] = {}
    for line, row in _read_csv(path, ("uid", "filename", "projection")):
        name, view = row["filename"].strip(), row["projection"].strip().capitalize()
        if not name:
            raise DataError(path, f"line {line}: empty file name", field="filename")
        if view not in (FRONTAL, LATERAL):
            raise DataError(path, f"line {line}: {row['projection']!r} is not Frontal or Lateral",
                            field="projection")
        table[name] = view
    return table


#: OpenI image ids that do not follow ``CXR<uid>_IM-...``: study 1's carry an extra ``_1`` (the only ones in the
#: 3,955 OpenI XMLs), which Kaggle's file names drop.
_OPENI_ID_PREFIX = {"1": "CXR1_1_"}


def openi_image_id(uid: str, kaggle_stem: str) -> str:
    """The OpenI image id of a Kaggle file name stem: ``("2384", "2384_IM-0942-1001")`` -> ``CXR2384_IM-0942-1001``,
    ``("1", "1_IM-0001-4001")`` -> ``CXR1_1_IM-0001-4001`` (R2Gen's ids are OpenI's)."""
    head = f"{uid}_"
    if kaggle_stem.startswith(head):
        return _OPENI_ID_PREFIX.get(uid, f"CXR{uid}_") + kaggle_stem[len(head):]
    return "CXR" + kaggle_stem


def read_kaggle_reports(reports_csv: PathLike, projections_csv: PathLike) -> list[Study]:
    """Studies from Kaggle's ``indiana_reports.csv`` with their images from ``indiana_projections.csv``."""
    images: dict[str, list[str]] = {}
    for line, row in _read_csv(projections_csv, ("uid", "filename", "projection")):
        name = row["filename"].strip()
        stem = name[: -len(".dcm.png")] if name.endswith(".dcm.png") else name.rsplit(".", 1)[0]
        if not stem:
            raise DataError(projections_csv, f"line {line}: empty file name", field="filename")
        uid = row["uid"].strip()
        images.setdefault(uid, []).append(openi_image_id(uid, stem))
    studies = []
    for line, row in _read_csv(reports_csv, ("uid", "findings", "impression")):
        uid = row["uid"].strip()
        if not uid.isdigit():
            raise DataError(reports_csv, f"line {line}: {uid!r} is not a study number", field="uid")
        studies.append(Study(uid=uid, source=f"{reports_csv}:{line}",
                             image_ids=tuple(sorted(set(images.get(uid, ())))),
                             findings=row["findings"].strip(), impression=row["impression"].strip()))
    if not studies:
        raise DataError(reports_csv, "no report rows")
    return studies


def read_split_from(path: PathLike) -> dict[str, str]:
    """Study id -> split of an existing R2Gen-format annotation (to reuse its split)."""
    data = read_json(path)
    if not isinstance(data, dict) or not any(k in data for k in SPLITS):
        raise DataError(path, "not an R2Gen-format annotation (expected train/val/test lists)")
    split_of: dict[str, str] = {}
    for split in SPLITS:
        for entry in data.get(split, []):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise DataError(path, f"an entry of '{split}' has no string id", field="id")
            split_of[entry["id"]] = split
    return split_of


# -- images -------------------------------------------------------------------------------------
def detect_layout(images_dir: PathLike) -> str:
    """Which of LAYOUTS the folder holds, judged by the names in it (the majority wins)."""
    p = Path(images_dir)
    if not p.is_dir():
        raise DataError(p, "images folder not found" if not p.exists() else "not a folder")
    votes = dict.fromkeys(LAYOUTS, 0)
    with os.scandir(p) as entries:
        for entry in entries:
            if entry.is_dir() and re.fullmatch(r"CXR\d+_.+", entry.name):
                votes["r2gen"] += 1
            elif re.fullmatch(r"CXR\d+_.+\.png", entry.name, re.IGNORECASE):
                votes["openi"] += 1
            elif re.fullmatch(r"\d+_.+\.dcm\.png", entry.name, re.IGNORECASE):
                votes["kaggle"] += 1
    best = max(LAYOUTS, key=lambda name: votes[name])
    if votes[best] == 0:
        raise DataError(p, "no IU-Xray images found: expected CXR<n>_IM-....png (OpenI), "
                           "<n>_IM-....dcm.png (Kaggle) or CXR<n>_IM-..../0.png folders (R2Gen)")
    return best


def image_paths(study: Study, pair: tuple[str, str], layout: str) -> list[str]:
    """The two image paths (view 0, view 1) of ``study`` relative to the images folder."""
    if layout == "r2gen":
        return [f"{study.study_id}/0.png", f"{study.study_id}/1.png"]
    if layout == "openi":
        return [f"{image_id}.png" for image_id in pair]
    return [kaggle_filename(study.uid, image_id) for image_id in pair]


def choose_views(study: Study, views: str,
                 projections: Optional[Mapping[str, str]]) -> Union[tuple[str, str], str]:
    """(view 0, view 1) image ids, or the reason there is no such pair."""
    if len(study.image_ids) < 2:
        return "fewer than 2 images"
    if views == "order":
        return study.image_ids[0], study.image_ids[1]
    assert projections is not None
    labels = [projections.get(kaggle_filename(study.uid, i)) for i in study.image_ids]
    frontal = [i for i, v in zip(study.image_ids, labels) if v == FRONTAL]
    lateral = [i for i, v in zip(study.image_ids, labels) if v == LATERAL]
    if not frontal:
        return "no frontal image"
    if not lateral:
        return "no lateral image"
    return frontal[0], lateral[0]


class _ImageIndex:
    """Answers "does this image exist" from one listing of a flat folder (7k stats would be slower)."""

    def __init__(self, root: Path, layout: str) -> None:
        if not root.is_dir():
            raise DataError(root, "images folder not found" if not root.exists() else "not a folder")
        self.root = root
        self.flat = layout != "r2gen"
        self.names = {e.name for e in os.scandir(root) if e.is_file()} if self.flat else set()

    def missing(self, paths: Sequence[str]) -> list[str]:
        if self.flat:
            return [p for p in paths if p not in self.names]
        return [p for p in paths if not (self.root / p).is_file()]


# -- text and split -----------------------------------------------------------------------------
def report_text(study: Study, section: str) -> str:
    """The report for ``section``; ``both`` is FINDINGS then IMPRESSION (whichever are non-empty)."""
    if section == "findings":
        return study.findings
    if section == "impression":
        return study.impression
    return " ".join(t for t in (study.findings, study.impression) if t)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three numbers in [0, 1] that sum to 1."""
    if len(fractions) != 3 or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions):
        raise UsageError(f"split fractions must be three numbers in [0, 1] (train, val, test), not {fractions}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise UsageError(f"split fractions must sum to 1, not {sum(fractions):g}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def assign_splits(study_ids: Sequence[str], seed: int,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Study id -> split: ids ordered by ``sha256("<seed>:<id>")`` and cut by the fractions."""
    train, val, _ = check_fractions(fractions)
    order = sorted(set(study_ids), key=lambda i: (hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i))
    n = len(order)
    n_train = math.floor(n * train + 0.5)
    n_val = min(math.floor(n * val + 0.5), n - n_train)
    return {i: ("train" if k < n_train else "val" if k < n_train + n_val else "test")
            for k, i in enumerate(order)}


# -- the conversion -----------------------------------------------------------------------------
def convert(studies: Sequence[Study], options: ConvertOptions) -> Conversion:
    """Apply the rules in the module docstring; every study ends up in the annotation or in ``skipped``."""
    index = _ImageIndex(options.images_dir, options.layout) if options.images_dir is not None else None
    kept: list[tuple[Study, str, list[str]]] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    section_name = "FINDINGS and IMPRESSION" if options.section == "both" else options.section.upper()
    for study in sorted(studies, key=lambda s: (s.study_id, s.source)):
        sid = study.study_id

        def skip(reason: str, detail: str = "") -> None:
            skipped.append(Skipped(sid, study.source, reason, detail))

        if sid in seen:
            skip("duplicate study id", f"already read from {seen[sid]}")
            continue
        seen[sid] = study.source
        text = report_text(study, options.section)
        if not text:
            skip(f"empty {section_name}")
            continue
        pair = choose_views(study, options.views, options.projections)
        if isinstance(pair, str):
            skip(pair, " ".join((f"{len(study.image_ids)} image(s)",) + study.image_ids))
            continue
        if options.split_from is not None and sid not in options.split_from:
            skip("not in the --split-from annotation")
            continue
        paths = image_paths(study, pair, options.layout)
        missing = index.missing(paths) if index is not None else []
        if missing:
            skip("image file missing", " ".join(missing))
            continue
        kept.append((study, text, paths))
    if options.split_from is not None:
        split_of = dict(options.split_from)
    else:
        split_of = assign_splits([s.study_id for s, _, _ in kept], options.seed, options.fractions)
    annotation: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for study, text, paths in kept:
        split = split_of[study.study_id]
        annotation[split].append({"id": study.study_id, "report": text, "image_path": paths, "split": split})
    return Conversion(annotation, skipped)
