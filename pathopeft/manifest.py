"""The CSV manifest contract shared by every stage: one reader core, one error that names file, line and problem.

Each stage keeps its own columns and row checks (``wsi.config.read_manifest``: slides; ``mil.data``: bags;
``seg.data``: images and masks) but reads through :func:`read_rows`, so they agree on the rules a user meets
everywhere: UTF-8 (a byte-order mark is fine), header names stripped, required columns present, required
fields non-empty, at least one row, relative paths resolved against the CSV's own folder, and every error as
``<csv>:<line>: <problem>``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pathopeft.errors import UserError


class ManifestError(UserError, ValueError):
    """A manifest that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Row:
    """One data row: its 1-based line in the file (the header is line 1) and its stripped values."""

    manifest: Path
    line: int
    values: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.values.get(column, "")

    def get(self, column: str, default: str | None = None) -> str | None:
        return self.values.get(column) or default

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"

    def path(self, column: str) -> Path:
        """The value of ``column`` as a path, relative ones resolved against the manifest's folder."""
        return resolve(self.manifest, self[column])


def resolve(csv_path: Path, raw: str) -> Path:
    """``raw`` relative to the CSV's folder, normalised lexically (``..`` kept meaningful, symlinks not followed)."""
    if os.path.isabs(raw):
        return Path(os.path.normpath(raw))
    return Path(os.path.normpath(os.path.join(os.path.abspath(csv_path.parent), raw)))


def read_rows(
    path: str | os.PathLike[str],
    required: Sequence[str],
    optional: Iterable[str] = (),
    error: type[ManifestError] = ManifestError,
    allow_empty: Iterable[str] = (),
) -> list[Row]:
    """The rows of a manifest, checked for the rules every manifest shares (raises ``error``).

    Args:
        path: the CSV file.
        required: columns that must be in the header and, unless in ``allow_empty``, non-empty in every row.
        optional: columns named in the "missing column" message so users learn they exist.
        error: the stage's subclass of :class:`ManifestError`.
        allow_empty: required columns whose value may be blank (e.g. ``mpp``).
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: manifest not found")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                extra = f" (optional: {', '.join(optional)})" if optional else ""
                raise error(f"{p}: missing column(s) {missing}; header is {header}, need {list(required)}{extra}")
            blank_ok = set(allow_empty)
            rows = []
            for line, raw in enumerate(reader, start=2):
                values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
                if not any(values.values()):
                    continue  # a blank line
                for col in required:
                    if col not in blank_ok and not values.get(col):
                        raise error(f"{p}:{line}: empty {col}")
                rows.append(Row(p, line, values))
    except UnicodeDecodeError as e:
        raise error(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise error(f"{p}: not a readable CSV file ({e})") from None
    if not rows:
        raise error(f"{p}: manifest has no rows")
    return rows


def check_unique(rows: Sequence[Row], key: str | None, values: Sequence[str], error: type[ManifestError]) -> None:
    """Every value (one per row, e.g. the ids) occurs once; the message names both lines."""
    seen: dict[str, int] = {}
    for row, value in zip(rows, values, strict=True):
        if value in seen:
            raise error(f"{row.where}: duplicate {key or 'id'} {value!r} (first on line {seen[value]})")
        seen[value] = row.line


def check_choice(row: Row, column: str, choices: Sequence[str], error: type[ManifestError]) -> str:
    """The value of ``column`` lower-cased, which must be one of ``choices``."""
    value = row[column].lower()
    if value not in choices:
        raise error(f"{row.where}: {column} {row[column]!r} is not one of {list(choices)}")
    return value
