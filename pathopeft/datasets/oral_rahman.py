"""Oral-mucosa tiles (Rahman et al. 2020, normal vs OSCC, 224²): the tile table and its leakage-safe split units.

Why a split unit and not the file: the set has no patient ids and consecutive image numbers look like
neighbouring fields of one slide, so the data README asks for splits by ``seq_block10`` (class, magnification,
number // 10). Eight same-class near-duplicate pairs (``group``) straddle two blocks; blocks linked by such a
pair are merged into one unit, so neither a block nor a duplicate pair is ever in two splits. The records are
the :class:`~pathopeft.datasets.lc25000.TileRecord` the bag builder consumes (``group_id`` = the unit), so
:func:`~pathopeft.datasets.lc25000.split_groups` splits them (stratified per class, seeded).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

from pathopeft.datasets.lc25000.tiles import TileRecord

#: manifest.csv classes of the set.
ORAL_CLASSES = ("oral_normal", "oral_scc")
REQUIRED_COLUMNS = ("path", "class", "group", "seq_block10")


def _find(parent: dict[str, str], x: str) -> str:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def split_units(rows: list[dict[str, str]]) -> dict[str, str]:
    """``seq_block10`` → split unit id: blocks sharing a near-duplicate ``group`` are merged (union-find).

    The unit id is the smallest block name of the unit, so it is stable and readable.
    """
    parent = {r["seq_block10"]: r["seq_block10"] for r in rows}
    first_block: dict[str, str] = {}
    for r in rows:
        b, g = r["seq_block10"], r["group"]
        if g in first_block:
            ra, rb = _find(parent, first_block[g]), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        else:
            first_block[g] = b
    return {b: _find(parent, b) for b in parent}


def load_oral_tiles(
    root: str | os.PathLike[str],
    labels: Mapping[str, str] | None = None,
    rel_prefix: str = "",
    check_files: bool = True,
) -> list[TileRecord]:
    """Read ``<root>/manifest.csv`` into tile records, in manifest order; ``group_id`` = the split unit.

    ``labels`` maps a manifest class to the record's label (default: the class name itself); ``rel_prefix``
    is prepended to each ``rel`` (a stream of several datasets keys tiles relative to their common parent).
    Errors name the manifest and line, because a silently skipped row would bias every split.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: oral tile manifest not found (columns {', '.join(REQUIRED_COLUMNS)})")
    labels = dict(labels or {c: c for c in ORAL_CLASSES})
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = []
        for row in reader:
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{manifest}:{reader.line_num}"
            if not all(row.get(k) for k in REQUIRED_COLUMNS):
                raise ValueError(f"{where}: empty field among {', '.join(REQUIRED_COLUMNS)}")
            if row["class"] not in labels:
                raise ValueError(f"{where}: unknown class {row['class']!r} (expected one of {sorted(labels)})")
            row["where"] = where
            rows.append(row)
    if not rows:
        raise ValueError(f"{manifest}: no tiles listed")
    unit = split_units(rows)
    records: list[TileRecord] = []
    seen: set[str] = set()
    for row in rows:
        if row["path"] in seen:
            raise ValueError(f"{row['where']}: duplicate path {row['path']!r}")
        seen.add(row["path"])
        path = root / row["path"]
        if check_files and not path.is_file():
            raise FileNotFoundError(f"{row['where']}: tile {path} not found")
        rel = f"{rel_prefix}{row['path']}"
        records.append(TileRecord(path, labels[row["class"]], unit[row["seq_block10"]], rel, row.get("sha256", "")))
    return records
