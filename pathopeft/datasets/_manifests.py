"""What the dataset manifest writers share: reading a dataset folder's own ``manifest.csv``, checking the
files it lists, and writing a segmentation manifest (paths relative to the CSV's folder, CRLF lines as
``csv`` writes them)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from pathopeft.io import atomic_write_text
from pathopeft.seg.images import SegDataError


def _rel(target: Path, out_csv: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(out_csv.parent))).as_posix()


def _write_manifest(out_csv: Path, rows: list[dict[str, str]]) -> Path:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)  # csv's \r\n, as the committed manifests have
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_csv, buf.getvalue())
    return out_csv


def _source_rows(root: Path, name: str) -> list[dict[str, str]]:
    src = root / "manifest.csv"
    if not src.is_file():
        raise SegDataError(f"{src}: {name} manifest not found (is {root} the {name} folder?)")
    with src.open(newline="") as f:
        return list(csv.DictReader(f))


def _checked(path: Path, src: Path) -> Path:
    if not path.is_file():
        raise SegDataError(f"{src}: listed file {path} not found")
    return path
