"""Atomic file writing: a reader sees the old file or the new one, never half of one.

Every file the toolkit writes for a user (annotations, labels, enhanced images, predictions,
checkpoints) goes through ``atomic_write``: write a temporary file in the same directory,
fsync, then ``os.replace``. On any error the temporary file is removed and the target is
untouched; an OSError (disk full, permission denied) becomes a one-line :class:`WriteError` naming
the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, Union

from ifnet.errors import IFNetError

PathLike = Union[str, "os.PathLike[str]"]


class OutputExistsError(IFNetError):
    """Refusing to overwrite a user's file without being asked to."""


class WriteError(IFNetError, OSError):
    """Writing an output failed (disk full, permission denied...): one line naming the file.

    Also an OSError (same errno/strerror), so code that handles I/O errors keeps working.
    """

    def __init__(self, path: PathLike, cause: OSError) -> None:
        OSError.__init__(self, cause.errno, cause.strerror or str(cause) or type(cause).__name__, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: cannot write: {self.strerror}; the previous file, if any, is unchanged"

    def __reduce__(self) -> tuple:  # picklable across worker processes despite the custom __init__
        return (type(self), (self.filename, OSError(self.errno, self.strerror)))


def remove_path(path: PathLike, *, ignore_errors: bool = False) -> None:
    """Remove a file, a symlink (never what it points at) or a folder tree; nothing when it is absent."""
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        if not ignore_errors:
            raise


def check_writable_target(path: PathLike, overwrite: bool) -> Path:
    """Raise a clear error if ``path`` (a file to write) is a folder, or exists and ``overwrite`` is False."""
    p = Path(path)
    if p.is_dir():
        raise OutputExistsError(f"{p}: is a folder; give a file name")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p}: already exists; pass --overwrite to replace it")
    return p


def check_writable_folder(folder: PathLike) -> Path:
    """Raise OutputExistsError if files cannot be created in ``folder`` (or, when it does not exist yet, in
    its nearest existing ancestor, where it would be created): found before the work, not after it."""
    p = Path(folder) if str(folder) else Path(".")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputExistsError(f"{probe}: is a file, so {p} cannot be a folder to write into")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{probe}: no permission to write into this folder")
    return p


def existing_entries(folder: PathLike, names: Sequence[str]) -> list[str]:
    """The ``names`` present in ``folder`` (a dangling symlink counts: replacing it would still replace a user's
    entry), in the order given."""
    return [name for name in names if (Path(folder) / name).exists() or (Path(folder) / name).is_symlink()]


def check_distinct_targets(targets: dict) -> None:
    """Raise a UsageError if two output options name the same file: ``{"--out": path, "--skipped": path}``
    (``None`` values are ignored); otherwise the second write would silently replace the first."""
    from ifnet.errors import UsageError

    seen: dict = {}
    for option, path in targets.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} are the same file: {path}")
        seen[key] = option


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere
    by setting and restoring it (briefly visible to other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_user_files(path: PathLike) -> None:
    """Give ``path`` (and, for a folder, the files and folders directly in it) the modes a plain ``open`` or
    ``mkdir`` would have given: ``mkstemp``/``mkdtemp`` make private 0600/0700 temporaries, and results,
    checkpoints and exports moved into place from them must be readable by whoever the user's umask allows."""
    mask = current_umask()
    p = Path(path)
    p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    if p.is_dir():
        for child in p.iterdir():
            if not child.is_symlink():
                child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; move it into place on success.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise WriteError(target, e) from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's file is private (0600); the result is not
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(target, e) from None
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Serialise first (so a non-serialisable object never leaves a file), then write atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


class _DuplicateKey(ValueError):
    """A JSON object with the same key twice (``json`` would keep the last one silently)."""


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a missing or malformed file, or an object with a key twice (a duplicated study id
    would otherwise be dropped silently), is a one-line DataError naming it."""
    from ifnet.errors import DataError

    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DataError(p, f"key {e.args[0]!r} appears twice in one JSON object (which one is meant?)") from None
    except FileNotFoundError:
        raise DataError(p, "file not found") from None
    except IsADirectoryError:
        raise DataError(p, "is a directory, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise DataError(p, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(p, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:  # [[[[...]]]] thousands deep: not a file we wrote, and no crash either
        raise DataError(p, "JSON nested too deeply") from None
