"""Errors that reach the user as one clear line.

Library code raises these; the CLI prints ``ifnet <cmd>: error: <message>`` and exits non-zero,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Iterable, Optional


class IFNetError(Exception):
    """A user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(IFNetError):
    """Bad command-line usage (argparse convention: exit 2)."""

    exit_code = 2


class DataError(IFNetError):
    """Bad input data. The message names the file and, where known, the record and field."""

    def __init__(self, path: object, message: str, *, record: Optional[str] = None,
                 field: Optional[str] = None) -> None:
        self.path = str(path)
        self.record = record
        self.field = field
        self.detail = message
        where = self.path
        if record is not None:
            where += f": study {record}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class ValidationError(IFNetError):
    """Several data problems found at once; each line names file, study and field."""

    #: At most this many problems are printed; the rest are counted (all are kept in ``problems``).
    MAX_LINES = 20

    def __init__(self, problems: Iterable[DataError], *, header: str = "") -> None:
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[: self.MAX_LINES]]
        if len(self.problems) > self.MAX_LINES:
            lines.append(f"... and {len(self.problems) - self.MAX_LINES} more")
        head = header or f"{len(self.problems)} problem(s) found"
        super().__init__(head + ":\n  " + "\n  ".join(lines))
