"""Enhance a folder of X-rays into a mirrored folder: the library behind ``ifnet enhance``.

Design choices (docs/IEC.md explains them for users):

* **Input files** are chosen by suffix (``.png .jpg .jpeg .dcm .dicom``, any case); the format itself
  is sniffed by :func:`ifnet.data.images.read_xray`, so a ``.png`` that is really a JPEG still
  works. Hidden files and folders (``.name``) are skipped: they include our own temporary files.
  Symlinked folders are not followed (no cycles).
* **Output** mirrors the tree and is always a lossless PNG of the enhanced pixels, so reading it back
  gives exactly what the on-the-fly transform computes: ``x.png -> x.png`` (same bit depth),
  ``x.jpg -> x.png``, ``x.dcm -> x.png`` (16-bit, as read_xray windows DICOM to uint16).
* **Up to date** means: the output exists, its mtime is not older than the input's, and the
  enhancement parameters stored *inside* the output PNG (a ``tEXt`` chunk) equal this run's. Keeping
  the parameters in each file, rather than in a separate manifest, makes the check exactly as
  atomic as the file itself: an interrupted run can never leave a manifest that vouches for files
  it did not write. A re-run with the same parameters writes nothing at all.
* **Writes** are atomic (temporary file + ``os.replace``), so a crash leaves the old output or the
  new one. IN_DIR is never written unless ``in_place`` is set; that is checked for every output
  folder before anything is written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ifnet.errors import IFNetError, UsageError
from ifnet.iec.clahe import AdaptiveCLAHE, Enhancer, build_enhancer
from ifnet.io_utils import atomic_write_bytes

#: Suffixes (lower case) of the files that are enhanced; everything else is ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
#: Keyword of the PNG tEXt chunk holding the parameters an output was made with.
PARAMS_KEYWORD = b"ifnet-enhance"
#: Version of what the chunk stores; bump if the output of the same parameters would change.
#: 2: 16-bit images are equalised on 256 grey levels (ifnet.iec.clahe); the input's size and mtime are stored.
OUTPUT_FORMAT = 2

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class EnhanceSettings:
    """What one run applies: the enhancer's name and its CLAHE parameters."""

    mode: str = "clahe"  #: "clahe", "adaptive" or "none" (a lossless PNG copy)
    clip_limit: float = 1.7
    tile_grid: int = 8

    def __post_init__(self) -> None:
        build_enhancer(self.mode, self.clip_limit, self.tile_grid)  # validates; raises a clear error

    def enhancer(self) -> Enhancer:
        return build_enhancer(self.mode, self.clip_limit, self.tile_grid)

    def params(self) -> dict:
        """Everything that determines the output pixels. Stored in each output and compared on
        re-runs; the OpenCV version is part of it because another CLAHE build may round differently."""
        import cv2

        params: dict = {"format": OUTPUT_FORMAT, "mode": self.mode, "opencv": cv2.__version__}
        if self.mode != "none":
            params.update(clip_limit=float(self.clip_limit), tile_grid=int(self.tile_grid))
        enhancer = self.enhancer()
        if isinstance(enhancer, AdaptiveCLAHE):
            params["criterion"] = enhancer.criterion.describe()
        # Round-trip through JSON so the comparison with a stored copy is like for like.
        return json.loads(json.dumps(params, sort_keys=True))


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path


@dataclass
class EnhanceSummary:
    """Counts of one run. ``judged_low`` counts adaptive-mode outputs that CLAHE was applied to."""

    enhanced: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0  #: non-image files in IN_DIR, left alone
    judged_low: int = 0
    failures: List[str] = field(default_factory=list)

    def line(self) -> str:
        return f"enhanced {self.enhanced}, skipped {self.skipped} (up to date), failed {self.failed}"


# -- PNG parameter chunk ------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: np.ndarray, info: dict) -> bytes:
    """Lossless PNG of ``img`` (8- or 16-bit gray) with ``info`` as JSON in a tEXt chunk after IHDR."""
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise IFNetError(f"OpenCV could not encode a {img.dtype} image of shape {img.shape} as PNG")
    png = buf.tobytes()
    # IHDR is always the first chunk: 8-byte signature + 4 length + 4 type + 13 data + 4 CRC = 33.
    if png[:8] != _PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise IFNetError("OpenCV produced a PNG without a leading IHDR chunk")
    text = PARAMS_KEYWORD + b"\x00" + json.dumps(info, sort_keys=True).encode("ascii")
    return png[:33] + _png_chunk(b"tEXt", text) + png[33:]


def read_stored_info(path: Path) -> Optional[dict]:
    """The ``ifnet-enhance`` chunk of a PNG as a dict, or None (no chunk, not a PNG, unreadable).

    Reads only the chunks before the image data, so it costs one small read per file.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return None
            for _ in range(64):  # ancillary chunks before IDAT are few; bound the walk anyway
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind == b"tEXt" and length < 65536:
                    data = fh.read(length)
                    keyword, _, text = data.partition(b"\x00")
                    if keyword == PARAMS_KEYWORD:
                        info = json.loads(text.decode("ascii"))
                        return info if isinstance(info, dict) else None
                    fh.seek(4, os.SEEK_CUR)
                else:
                    fh.seek(length + 4, os.SEEK_CUR)
    except (OSError, ValueError, RecursionError):  # unreadable output or a damaged chunk: not up to date
        return None
    return None


# -- planning -----------------------------------------------------------------------------------

def output_relpath(rel: Path) -> Path:
    """Where the output of input ``rel`` goes, relative to OUT_DIR: always a ``.png``."""
    return rel if rel.suffix.lower() == ".png" else rel.with_suffix(".png")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_folders(in_dir: Path, out_dir: Path, *, in_place: bool) -> Tuple[Path, Path]:
    """Resolve both folders and refuse what would modify IN_DIR (UsageError, exit 2)."""
    if not in_dir.exists():
        raise UsageError(f"IN_DIR {in_dir}: no such folder")
    if not in_dir.is_dir():
        raise UsageError(f"IN_DIR {in_dir}: is not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir}: exists and is not a folder")
    src_root, dst_root = in_dir.resolve(), out_dir.resolve()
    if _inside(dst_root, src_root) and not in_place:
        where = "is IN_DIR" if dst_root == src_root else "is inside IN_DIR"
        raise UsageError(f"OUT_DIR {out_dir} {where}; enhance never modifies its input. "
                         "Choose another OUT_DIR, or pass --in-place to write there anyway")
    return src_root, dst_root


def _walk(src_root: Path, dst_root: Path) -> Tuple[List[Path], int, List[str]]:
    """Image files under ``src_root`` (relative paths, sorted), the count of other files, and one failure
    message per folder that could not be listed (its images would otherwise be left out silently)."""
    images: List[Path] = []
    ignored = 0
    unreadable: List[str] = []

    def note(error: OSError) -> None:
        unreadable.append(f"{error.filename}: cannot list this folder ({error.strerror or error}); "
                          "its images were not enhanced")

    for dirpath, dirnames, filenames in os.walk(src_root, onerror=note):
        here = Path(dirpath)
        # Never descend into OUT_DIR (possible with --in-place): outputs are not inputs.
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d) != dst_root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                images.append((here / name).relative_to(src_root))
            else:
                ignored += 1
    return images, ignored, unreadable


def plan(src_root: Path, dst_root: Path, *, in_place: bool) -> Tuple[List[Job], List[str], int]:
    """(jobs, failure messages for inputs that cannot be done, ignored-file count)."""
    rels, ignored, unreadable = _walk(src_root, dst_root)
    by_output: Dict[Path, List[Path]] = {}
    for rel in rels:
        by_output.setdefault(output_relpath(rel), []).append(rel)
    jobs: List[Job] = []
    failures: List[str] = list(unreadable)
    for out_rel, ins in by_output.items():
        dst = dst_root / out_rel
        if len(ins) > 1 and in_place and dst_root == src_root and out_rel in ins and len(ins) == 2 \
                and read_stored_info(dst) is not None:
            # In place, x.jpg's output x.png sits beside it and is found by the walk: it is an
            # output of an earlier run, not a second input.
            ins = [r for r in ins if r != out_rel]
        if len(ins) > 1:
            names = ", ".join(str(src_root / r) for r in ins)
            failures.extend(f"{src_root / r}: {names} would all be written to {dst}; rename one"
                            for r in ins)
            continue
        jobs.append(Job(src_root / ins[0], dst))
    if not in_place:
        # Belt and braces: no output folder may resolve into IN_DIR (e.g. IN_DIR inside OUT_DIR
        # and a subfolder named like it, or a symlink in OUT_DIR pointing into IN_DIR).
        for parent in {job.dst.parent for job in jobs}:
            if _inside(parent.resolve(), src_root):
                raise UsageError(f"output folder {parent} lies inside IN_DIR {src_root}; "
                                 "enhance never modifies its input")
    return jobs, failures, ignored


def freshness(job: Job, params: dict, *, overwrite: bool = False) -> Tuple[str, str]:
    """("fresh" | "stale" | "conflict", message). A conflict is an in-place file already
    enhanced with other parameters (enhancing it again would apply CLAHE twice), or a file in
    OUT_DIR that ``ifnet enhance`` did not write (the user's: replaced only with ``overwrite``)."""
    if job.dst != job.src:
        own = read_stored_info(job.src)
        if own is not None and own.get("clahe_applied"):
            return "conflict", (f"{job.src}: is itself an output of ifnet enhance (CLAHE applied with "
                                f"{json.dumps(own.get('params'))}); enhancing it again would apply CLAHE twice. "
                                "Enhance the original images instead")
    try:
        dst_stat = os.stat(job.dst)
        src_stat = os.stat(job.src)
    except OSError:
        return "stale", ""  # missing output (or a vanished input, which the worker will report)
    stored = read_stored_info(job.dst)
    stored_params = stored.get("params") if stored else None
    if job.dst == job.src:
        if stored is None:
            return "stale", ""
        if stored_params == params:
            return "fresh", ""
        return "conflict", (f"{job.src}: already enhanced in place with {json.dumps(stored_params)}; "
                            "enhancing again would apply CLAHE twice. Restore the original or use "
                            "a separate OUT_DIR")
    if stored is None and not overwrite:
        return "conflict", (f"{job.dst}: exists and was not written by ifnet enhance; not replaced "
                            f"(move it away, or pass --overwrite to replace it with the enhanced {job.src})")
    if stored_params != params or dst_stat.st_mtime_ns < src_stat.st_mtime_ns:
        return "stale", ""
    if stored.get("source") != source_stamp(src_stat):  # the input was replaced, even by an older-dated file
        return "stale", ""
    return "fresh", ""


def source_stamp(st: os.stat_result) -> dict:
    """What identifies the input an output was made from: its size and modification time (ns). Stored in
    the output, so an input replaced by another file (``cp -p``, ``rsync -a``, a restore from backup: an
    older mtime than the output's) still makes the output stale."""
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


# -- doing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Result:
    ok: bool
    message: str = ""
    clahe_applied: bool = False  #: False for mode "none" and for images adaptive judged normal


def enhance_one(job: Job, settings: EnhanceSettings, params: dict) -> _Result:
    """Read, enhance and atomically write one image. Data and I/O problems become a failed result."""
    from ifnet.data.images import read_xray

    try:
        before = os.stat(job.src)
        img = read_xray(job.src)
        enhancer = settings.enhancer()
        if isinstance(enhancer, AdaptiveCLAHE):
            out, verdict = enhancer.apply_and_judge(img)
            applied = verdict.low_quality
        else:
            out, applied = enhancer(img), settings.mode != "none"
        data = encode_png(out, {"params": params, "clahe_applied": applied, "source": source_stamp(before)})
    except IFNetError as e:
        return _Result(False, str(e))
    except OSError as e:
        return _Result(False, f"{job.src}: cannot read: {e.strerror or e}")
    try:
        atomic_write_bytes(job.dst, data)
        src_mtime = os.stat(job.src).st_mtime_ns
        if os.stat(job.dst).st_mtime_ns < src_mtime:
            # An input stamped in the future (copied from a machine with a fast clock) would make
            # its output look stale forever; give the output the input's time instead.
            os.utime(job.dst, ns=(src_mtime, src_mtime))
    except OSError as e:
        return _Result(False, f"{job.dst}: cannot write: {e.strerror or e}")
    return _Result(True, clahe_applied=applied)


def _init_worker() -> None:
    import cv2

    # One process per core already: OpenCV's own thread pool on top would oversubscribe.
    cv2.setNumThreads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Workers must not be plain forks of this process: a fork copies OpenCV's (or BLAS's) thread
    pool locks in whatever state another thread holds them, and the child can wait on them forever
    (seen with `fork` after CLAHE had run in the parent). A fork server is a fresh interpreter that
    imports this module once and forks cheap workers from there; spawn where it is not available."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ifnet.iec.enhance", "cv2", "ifnet.data.images"])
        return ctx
    return multiprocessing.get_context("spawn")


def _enhance_star(args: Tuple[Job, EnhanceSettings, dict]) -> _Result:
    return enhance_one(*args)


def _stderr(message: str) -> None:
    from tqdm import tqdm

    # tqdm.write prints above an active progress bar instead of through it.
    tqdm.write(message, file=sys.stderr)


def enhance_tree(in_dir: os.PathLike | str, out_dir: os.PathLike | str,
                 settings: EnhanceSettings = EnhanceSettings(), *, workers: int = 1,
                 in_place: bool = False, overwrite: bool = False, progress: bool = False,
                 report: Callable[[str], None] = _stderr) -> EnhanceSummary:
    """Enhance every image under ``in_dir`` into ``out_dir`` (see the module docstring).

    A file already in ``out_dir`` that this function did not write (no ``ifnet-enhance`` chunk) is
    left alone and counted as failed, unless ``overwrite``; with ``in_place`` and OUT_DIR = IN_DIR
    the inputs themselves are the outputs, as asked.
    ``workers`` processes (each with a single OpenCV thread); ``progress`` shows a tqdm bar on
    stderr; ``report`` receives one line per failed file as it happens. Raises UsageError for bad
    folders before writing anything; per-file problems are counted in the returned summary.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    src_root, dst_root = check_folders(Path(in_dir), Path(out_dir), in_place=in_place)
    jobs, failures, ignored = plan(src_root, dst_root, in_place=in_place)
    params = settings.params()
    summary = EnhanceSummary(ignored=ignored)
    for message in failures:
        summary.failed += 1
        summary.failures.append(message)
        report(message)
    todo: List[Job] = []
    for job in jobs:
        state, message = freshness(job, params, overwrite=overwrite)
        if state == "fresh":
            summary.skipped += 1
        elif state == "conflict":
            summary.failed += 1
            summary.failures.append(message)
            report(message)
        else:
            todo.append(job)
    if todo:
        _run(todo, settings, params, workers, progress, report, summary)
    return summary


def _run(todo: Sequence[Job], settings: EnhanceSettings, params: dict, workers: int,
         progress: bool, report: Callable[[str], None], summary: EnhanceSummary) -> None:
    from tqdm import tqdm

    def record(result: _Result, bar) -> None:
        if result.ok:
            summary.enhanced += 1
            summary.judged_low += int(result.clahe_applied and settings.mode == "adaptive")
        else:
            summary.failed += 1
            summary.failures.append(result.message)
            report(result.message)
        bar.update(1)

    tasks = [(job, settings, params) for job in todo]
    workers = min(workers, len(todo))
    if workers == 1:
        import cv2

        threads = cv2.getNumThreads()
        _init_worker()  # same single-threaded OpenCV as a pool worker, so 1 vs N is a fair ratio
        try:
            with tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not progress) as bar:
                for task in tasks:
                    record(_enhance_star(task), bar)
        finally:
            cv2.setNumThreads(threads)
        return
    # Small chunks: progress stays smooth and the two workers finish close together.
    with _pool_context().Pool(workers, initializer=_init_worker) as pool:
        with tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not progress) as bar:
            for result in pool.imap_unordered(_enhance_star, tasks, chunksize=4):
                record(result, bar)
