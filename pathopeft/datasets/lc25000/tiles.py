"""LC25000 lung tiles: the label space, the tile table (``manifest.csv``) and the group-stratified splits."""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TILE_PX = 224
#: manifest.csv class → bag label string (short names are accepted too).
CLASS_NAMES = {"lung_n": "benign", "lung_aca": "aca", "lung_scc": "scc"}
#: Class-incremental label space shared by all tasks.
LABEL_SPACE = {"benign": 0, "aca": 1, "scc": 2}
#: Task order of the continual sequence; task t is "tumour class t vs benign".
TASKS = ("aca", "scc")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TileRecord:
    """One tile: ``path`` (absolute), ``label`` (``benign``/``aca``/``scc``), ``group_id`` (near-duplicate group).

    ``rel`` is the path relative to the data root, the tile's identity in caches and H5 files (it does not
    change when the data moves); ``sha256`` comes from the manifest when present.
    """

    path: Path
    label: str
    group_id: str
    rel: str
    sha256: str = ""


def load_tile_table(root: str | os.PathLike[str], check_files: bool = True) -> list[TileRecord]:
    """Read ``<root>/manifest.csv`` (``path,class,group_id,...``) into tile records, in manifest order.

    Errors name the manifest and line, because a silently skipped row would bias every split.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: tile manifest not found (expected columns path,class,group_id)")
    short = {v: v for v in CLASS_NAMES.values()}
    records: list[TileRecord] = []
    seen: set[str] = set()
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "class", "group_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            where = f"{manifest}:{reader.line_num}"
            rel, cls, group = ((row.get(k) or "").strip() for k in ("path", "class", "group_id"))
            if not rel or not group:
                raise ValueError(f"{where}: empty path or group_id")
            label = CLASS_NAMES.get(cls) or short.get(cls)
            if label is None:
                raise ValueError(f"{where}: unknown class {cls!r} (expected one of {sorted(CLASS_NAMES)})")
            if rel in seen:
                raise ValueError(f"{where}: duplicate path {rel!r}")
            seen.add(rel)
            path = root / rel
            if check_files and not path.is_file():
                raise FileNotFoundError(f"{where}: tile {path} not found")
            records.append(TileRecord(path, label, group, rel, (row.get("sha256") or "").strip()))
    if not records:
        raise ValueError(f"{manifest}: no tiles listed")
    return records


def split_groups(
    tiles: Sequence[TileRecord], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[TileRecord]]:
    """Train/val/test by ``group_id``, stratified per class, deterministic from ``seed``.

    Whole groups are assigned (near-duplicates never straddle splits); each class's groups are shuffled by
    an RNG keyed on (seed, class name), so adding a class does not reshuffle the others.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    by_group: dict[str, list[TileRecord]] = {}
    for t in tiles:
        by_group.setdefault(t.group_id, []).append(t)
    group_label: dict[str, str] = {}
    for g, members in by_group.items():
        labels = {t.label for t in members}
        if len(labels) != 1:
            raise ValueError(f"group {g!r} mixes classes {sorted(labels)}: cannot stratify by class")
        group_label[g] = labels.pop()
    out: dict[str, list[TileRecord]] = {s: [] for s in SPLITS}
    for label in sorted(set(group_label.values())):
        groups = sorted(g for g, lab in group_label.items() if lab == label)
        order = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(len(groups))
        n = len(groups)
        n_train = round(fractions[0] * n)
        n_trainval = max(n_train, round((fractions[0] + fractions[1]) * n))
        for rank, gi in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_trainval else "test"
            out[split].extend(by_group[groups[gi]])
    return {s: sorted(ts, key=lambda t: t.rel) for s, ts in out.items()}


def read_tile(path: str | os.PathLike[str]) -> np.ndarray:
    """A tile as (224, 224, 3) uint8 RGB; other sizes are an error (coordinates assume 224-px tiles)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape != (TILE_PX, TILE_PX, 3):
        raise ValueError(f"{path}: expected a {TILE_PX}×{TILE_PX} RGB tile, got {rgb.shape}")
    return rgb
