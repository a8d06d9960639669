"""R2Gen-format annotation files and label files, validated before anything trains on them.

An annotation is the JSON file every R2Gen fork reads::

    {"train": [{"id": "CXR2384_IM-0942", "report": "The heart is normal. ...",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                "split": "train"}, ...],
     "val": [...], "test": [...]}

with image paths relative to an image folder (IU-Xray: two views per study; MIMIC-CXR: one or
more). Extra keys in an entry (``tag``, ``cls``, ...) are ignored.

:func:`load_annotation` checks the whole file before returning and reports every problem at once,
one line each, naming the file, the study and the field. R2Gen forks instead crash on the first bad
study hours into an epoch, or silently train on a duplicated test study.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ifnet.data.images import MAX_PIXELS, MAX_SIDE, ImageError, check_size, probe_image
from ifnet.errors import DataError, ValidationError
from ifnet.io_utils import PathLike, read_json
from ifnet.labels import NEGATIVE, NUM_OBSERVATIONS, OBSERVATIONS, POSITIVE

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Where R2Gen keeps the images: ``data/iu_xray/annotation.json`` next to ``data/iu_xray/images/``.
DEFAULT_IMAGE_DIR = "images"


@dataclass
class Study:
    """One report with its images. ``image_paths`` are relative to the image folder, in file order."""

    id: str
    report: str
    image_paths: list[str]
    split: str

    def image_files(self, image_root: PathLike) -> list[Path]:
        return [Path(image_root) / p for p in self.image_paths]


@dataclass
class Annotation:
    """A validated annotation file: studies per split, in file order."""

    path: Path
    splits: dict[str, list[Study]]
    #: The folder the image paths are relative to (None if not resolved).
    image_root: Optional[Path] = None

    def split(self, name: str) -> list[Study]:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(self.path, f"split {name!r} was not loaded (loaded: {', '.join(self.splits)})",
                            field=name) from None

    def all_studies(self) -> list[Study]:
        return [s for studies in self.splits.values() for s in studies]

    def image_files(self, study: Study) -> list[Path]:
        if self.image_root is None:
            raise DataError(self.path, "no image folder known for this annotation", record=study.id)
        return study.image_files(self.image_root)

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())


# -- validation -----------------------------------------------------------------------------------

def _unsafe_path_reason(rel: str) -> Optional[str]:
    """Why ``rel`` cannot be an image path inside the image folder, or None if it can.

    The check is lexical (no symlink resolution): linking an image folder into place is a normal
    way to lay out a dataset, but an annotation must not name files outside that folder.
    """
    # A leading backslash is rooted on Windows (a\b.png is relative, \b.png means C:\b.png), like '/'.
    if (PurePosixPath(rel.replace("\\", "/")).is_absolute() or PureWindowsPath(rel).is_absolute()
            or PureWindowsPath(rel).drive):
        return "absolute path; image paths must be relative to the image folder"
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return "points outside the image folder ('..')"
    return None


class _Checker:
    """Collects the problems of one annotation file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[DataError] = []

    def add(self, message: str, record: Optional[str] = None, field: Optional[str] = None) -> None:
        self.problems.append(DataError(self.path, message, record=record, field=field))


def _parse_entry(entry: Any, split: str, index: int, chk: _Checker, min_views: int,
                 max_views: Optional[int]) -> Optional[Study]:
    """A Study from one entry, or None (with problems recorded) if it is unusable."""
    where = f"{split}[{index}]"
    if not isinstance(entry, Mapping):
        chk.add(f"expected an object with id, report, image_path; got {type(entry).__name__}", record=where)
        return None
    ok = True
    raw_id = entry.get("id")
    if "id" not in entry:
        chk.add("missing", record=where, field="id")
        ok = False
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
        chk.add(f"must be a non-empty string, got {raw_id!r}", record=where, field="id")
        ok = False
    record = str(raw_id) if ok else where

    report = entry.get("report")
    if "report" not in entry:
        chk.add("missing", record=record, field="report")
        ok = False
    elif not isinstance(report, str):
        chk.add(f"must be a string, got {type(report).__name__}", record=record, field="report")
        ok = False
    elif not report.strip():
        chk.add("empty report", record=record, field="report")
        ok = False

    paths = entry.get("image_path")
    if "image_path" not in entry:
        chk.add("missing", record=record, field="image_path")
        ok = False
    elif not isinstance(paths, list):
        chk.add(f"must be a list of image paths, got {type(paths).__name__}", record=record, field="image_path")
        ok = False
    elif not paths:
        chk.add("no image paths", record=record, field="image_path")
        ok = False
    else:
        for i, p in enumerate(paths):
            if not isinstance(p, str) or not p.strip():
                chk.add(f"item {i} must be a non-empty path string, got {p!r}", record=record, field="image_path")
                ok = False
            elif (reason := _unsafe_path_reason(p)) is not None:
                chk.add(f"{p!r}: {reason}", record=record, field="image_path")
                ok = False
        strings = [p for p in paths if isinstance(p, str)]
        if len(set(strings)) != len(strings):
            chk.add("lists the same image more than once", record=record, field="image_path")
            ok = False
        if len(paths) < min_views:
            chk.add(f"has {len(paths)} image(s); at least {min_views} required", record=record, field="image_path")
            ok = False
        if max_views is not None and len(paths) > max_views:
            chk.add(f"has {len(paths)} images; at most {max_views} allowed", record=record, field="image_path")
            ok = False

    declared = entry.get("split")
    if declared is not None and declared != split:
        chk.add(f"says {declared!r} but is listed under {split!r}", record=record, field="split")
        ok = False
    if not ok:
        return None
    return Study(id=record, report=report, image_paths=list(paths), split=split)


def _check_images(study: Study, root: Path, chk: _Checker) -> None:
    for rel in study.image_paths:
        file = root / rel
        if not file.is_file():
            chk.add(f"image not found: {file}", record=study.id, field="image_path")
            continue
        try:
            width, height = probe_image(file)
            check_size(width, height, str(file), max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
        except ImageError as e:
            chk.add(f"unreadable image {e}", record=study.id, field="image_path")


def load_annotation(path: PathLike, image_root: Optional[PathLike] = None, *, check_images: bool = True,
                    min_views: int = 1, max_views: Optional[int] = None,
                    splits: Sequence[str] = SPLITS,
                    image_check_limits: Optional[Mapping[str, Optional[int]]] = None) -> Annotation:
    """Read and validate an R2Gen-format annotation file.

    ``image_root`` is the folder the image paths are relative to; None means the ``images`` folder
    next to the annotation file (R2Gen's layout). With ``check_images`` every image must exist and
    have a readable header of a sane size (only headers are read, so this is fast).
    Only the listed ``splits`` are loaded and checked; each must be present. ``image_check_limits`` (split ->
    N or None) checks the images of only the first N studies of a split: a run on a slice needs only those.

    Raises DataError for a file that is not JSON or not an object, and one ValidationError listing
    every problem otherwise: missing keys, wrong types, empty reports, duplicate ids (across the
    loaded splits), no or too few/many image paths, absolute paths or '..' leaving the image folder,
    missing or unreadable images.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(path, f"expected a JSON object with keys {', '.join(SPLITS)}; got {type(data).__name__}")
    if min_views < 1 or (max_views is not None and max_views < min_views):
        raise ValueError(f"need 1 <= min_views <= max_views, got min_views={min_views}, max_views={max_views}")
    root = Path(image_root) if image_root is not None else path.parent / DEFAULT_IMAGE_DIR

    chk = _Checker(path)
    root_ok = True
    if check_images and not root.is_dir():
        hint = "" if image_root is not None else " (R2Gen layout; pass the image folder explicitly)"
        chk.add(f"image folder not found: {root}{hint}", field="image_root")
        root_ok = False

    result: dict[str, list[Study]] = {}
    first_seen: dict[str, str] = {}  # id -> "split[index]" of its first occurrence
    for split in splits:
        if split not in data:
            chk.add(f"missing split (the file has: {', '.join(map(str, data)) or 'nothing'})", field=split)
            continue
        entries = data[split]
        if not isinstance(entries, list):
            chk.add(f"must be a list of studies, got {type(entries).__name__}", field=split)
            continue
        studies: list[Study] = []
        for index, entry in enumerate(entries):
            study = _parse_entry(entry, split, index, chk, min_views, max_views)
            if study is None:
                continue
            where = f"{split}[{index}]"
            if study.id in first_seen:
                chk.add(f"duplicate id: also at {first_seen[study.id]}, here at {where}", record=study.id,
                        field="id")
                continue
            first_seen[study.id] = where
            limit = (image_check_limits or {}).get(split)
            if check_images and root_ok and (limit is None or len(studies) < limit):
                _check_images(study, root, chk)
            studies.append(study)
        result[split] = studies

    if chk.problems:
        raise ValidationError(chk.problems, header=f"{path}: {len(chk.problems)} problem(s) in the annotation")
    return Annotation(path=path, splits=result, image_root=root)


# -- label files ----------------------------------------------------------------------------------

def load_label_file(path: PathLike) -> dict[str, np.ndarray]:
    """Binary labels per study: ``{id: int64 array [14]}`` in :data:`ifnet.labels.OBSERVATIONS` order.

    Accepts ``{"columns": [14 names], "labels": {id: [14 ints]}}`` (other top-level keys such as
    ``"_note"`` are ignored; columns in another order are re-ordered) or a plain ``{id: [14 ints]}``.
    Values must be 0 or 1: map CheXpert's uncertain (-1) and blank (-2) codes first (see
    :func:`ifnet.labels.to_binary`). Every problem is reported at once in a ValidationError.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(path, f"expected a JSON object of labels per study; got {type(data).__name__}")
    problems: list[DataError] = []
    order = list(range(NUM_OBSERVATIONS))
    if isinstance(data.get("labels"), Mapping):
        table = data["labels"]
        columns = data.get("columns")
        if columns is not None:
            if (not isinstance(columns, list) or sorted(map(str, columns)) != sorted(OBSERVATIONS)
                    or len(columns) != NUM_OBSERVATIONS):
                raise DataError(path, f"must list the {NUM_OBSERVATIONS} CheXpert observations "
                                      f"{list(OBSERVATIONS)}; got {columns!r}", field="columns")
            order = [columns.index(name) for name in OBSERVATIONS]
    else:
        table = data

    labels: dict[str, np.ndarray] = {}
    for study_id, values in table.items():
        if not isinstance(values, list) or len(values) != NUM_OBSERVATIONS:
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            problems.append(DataError(path, f"expected a list of {NUM_OBSERVATIONS} labels, got {got}",
                                      record=study_id, field="labels"))
            continue
        bad = [v for v in values if isinstance(v, bool) or v not in (NEGATIVE, POSITIVE)]
        if bad:
            hint = (" (map uncertain/blank CheXpert codes to 0/1 first, e.g. ifnet.labels.to_binary)"
                    if any(v in (-1, -2) for v in bad if not isinstance(v, bool)) else "")
            problems.append(DataError(path, f"labels must be 0 or 1, got {bad[0]!r}{hint}",
                                      record=study_id, field="labels"))
            continue
        labels[str(study_id)] = np.asarray(values, dtype=np.int64)[order]
    if problems:
        raise ValidationError(problems, header=f"{path}: {len(problems)} problem(s) in the label file")
    return labels
