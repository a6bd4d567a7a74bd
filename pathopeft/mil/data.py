"""Bags for MIL: one feature H5 per slide (the WSI stage's files, CLAM's or TRIDENT's) plus a manifest.

Manifest columns: ``slide_id,path,label,task,split`` (``path`` relative to the CSV; ``label`` a class name;
``task`` the task the bag belongs to; ``split`` train/val/test). Optional: ``thumbnail`` (an RGB picture of
the slide for heatmaps, with ``thumbnail_downsample``) and any other columns (kept in ``extra``). It is read
through :func:`pathopeft.manifest.read_rows`, so its errors read ``<csv>:<line>: <problem>`` like every stage's.

Bags are served one at a time (``batch_size=None``): N varies from slide to slide and 10^5 instances fit,
because nothing is padded to the largest bag. A ``instance_labels`` dataset in the H5 (0 = benign tile,
1 = tumour) is the localization ground truth when present.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathopeft.manifest import ManifestError, check_choice, check_unique, read_rows

log = logging.getLogger(__name__)

REQUIRED = ("slide_id", "path", "label", "task", "split")
SPLITS = ("train", "val", "test")
_CHUNK_ROWS = 65536  # rows of features read at a time by the finiteness check (bounded memory on huge bags)


class BagManifestError(ManifestError):
    """A manifest or bag that cannot be used: the message names the file (and manifest line)."""


@dataclass
class BagRecord:
    slide_id: str
    path: Path
    label: str
    task: str
    split: str
    thumbnail: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None  # where the row came from, so errors about the bag can name it
    line: int | None = None

    def where(self) -> str:
        """``bag <id>, manifest <csv>:<line>`` (or just the bag) for error messages about this bag."""
        return f"bag {self.slide_id}" + (f", manifest {self.manifest}:{self.line}" if self.manifest else "")


@dataclass
class SkippedBag:
    """A bag left out of the run up front (e.g. a slide without tissue), with the reason."""

    record: BagRecord
    reason: str


def read_bag_manifest(path: str | Path, extra_columns: Sequence[str] = ()) -> list[BagRecord]:
    """Parse and check a bag manifest (missing columns, empty fields, unknown splits, duplicate ids, missing
    files): every problem is one clear error naming file and line, so no row is silently dropped later.

    ``extra_columns``: further columns a producer guarantees (e.g. LC25000's ``witness_rate``); they must be
    present and non-empty, and land in :attr:`BagRecord.extra` (``thumbnail`` in :attr:`BagRecord.thumbnail`).
    """
    path = Path(path)
    required = [*REQUIRED, *(c for c in extra_columns if c not in REQUIRED)]
    rows = read_rows(path, required, optional=("thumbnail",), error=BagManifestError)
    check_unique(rows, "slide_id", [r["slide_id"] for r in rows], BagManifestError)
    records: list[BagRecord] = []
    for row in rows:
        split = check_choice(row, "split", SPLITS, BagManifestError)
        h5 = row.path("path")
        if not h5.is_file():
            raise BagManifestError(f"{row.where}: feature file {h5} not found")
        thumb = row.path("thumbnail") if row["thumbnail"] else None
        extra = {k: v for k, v in row.values.items() if k not in (*REQUIRED, "thumbnail")}
        records.append(
            BagRecord(
                row["slide_id"], h5, row["label"], row["task"], split, thumb, extra, manifest=path, line=row.line
            )
        )
    return records


def _non_finite(ds: h5py.Dataset) -> tuple[int, int | None]:
    """(number of NaN/Inf values, first row holding one) of a 2-D dataset, read in chunks of rows."""
    count, first = 0, None
    for start in range(0, ds.shape[0], _CHUNK_ROWS):
        bad = ~np.isfinite(ds[start : start + _CHUNK_ROWS])
        n = int(bad.sum())
        if n:
            count += n
            if first is None:
                first = start + int(np.flatnonzero(bad.any(axis=1))[0])
    return count, first


def _check_bag(f: h5py.File, rec: BagRecord) -> tuple[int, int]:
    """(N, D) of one open bag file, or a :class:`BagManifestError` naming the problem."""

    def bad(problem: str) -> BagManifestError:
        return BagManifestError(f"{rec.path}: {problem} ({rec.where()})")

    feats = f.get("features")
    if not isinstance(feats, h5py.Dataset):
        raise bad("no 'features' dataset" + (f" (has {sorted(f)})" if len(f) else " (file is empty)"))
    if feats.ndim != 2:
        raise bad(f"features of shape {feats.shape} are not (N, D)")
    if not np.issubdtype(feats.dtype, np.number):
        raise bad(f"features of dtype {feats.dtype} are not numbers")
    n, d = feats.shape
    if d == 0:
        raise bad(f"features of shape {feats.shape} have no columns")
    for name in ("coords", "instance_labels"):
        other = f.get(name)
        if other is None:
            continue
        if not isinstance(other, h5py.Dataset):
            raise bad(f"{name!r} is not a dataset")
        rows = other.shape[0] if other.ndim else 0
        if rows != n:
            raise bad(f"{name} has {rows} rows but features has {n}")
        if name == "coords" and (other.ndim != 2 or other.shape[1] != 2):
            raise bad(f"coords of shape {other.shape} are not (N, 2)")
    if n:
        count, first = _non_finite(feats)
        if count:
            raise bad(f"features hold {count} non-finite value(s) (NaN/Inf), first at row {first}")
    return n, d


def validate_bags(
    records: Sequence[BagRecord], classes: Sequence[str]
) -> tuple[list[BagRecord], list[SkippedBag], int]:
    """Check every bag of a run once, before any training, so a bad file fails in seconds with one line
    instead of a traceback (or NaN weights) hours in. Opens each H5 once and reads shapes, plus the features
    for a finiteness check. Returns ``(kept, skipped, D)``: bags with 0 tiles (the WSI stage writes (0, D)
    files for slides without tissue) are skipped with a warning; everything else wrong is an error, and all
    kept bags must share one feature dimension D."""
    known = set(classes)
    kept: list[BagRecord] = []
    skipped: list[SkippedBag] = []
    first: tuple[BagRecord, int] | None = None
    for rec in records:
        if rec.label not in known:
            where = f"{rec.manifest}:{rec.line}" if rec.manifest else str(rec.path)
            raise BagManifestError(
                f"{where}: label {rec.label!r} of bag {rec.slide_id} is not one of the classes {list(classes)}"
            )
        if not rec.path.is_file():
            raise BagManifestError(f"{rec.path}: feature file not found ({rec.where()})")
        try:
            with h5py.File(rec.path, "r") as f:
                n, d = _check_bag(f, rec)
        except OSError as e:
            detail = " ".join(str(e).split())  # one line, whatever HDF5 says
            raise BagManifestError(f"{rec.path}: not a readable HDF5 file: {detail} ({rec.where()})") from e
        if n == 0:
            reason = "empty bag (0 tiles; e.g. a slide without tissue)"
            log.warning("skipping %s: %s (%s)", rec.path, reason, rec.where())
            skipped.append(SkippedBag(rec, reason))
            continue
        if first is None:
            first = (rec, d)
        elif d != first[1]:
            raise BagManifestError(
                f"{rec.path}: feature dimension {d} differs from {first[1]} of bag {first[0].slide_id} "
                f"({first[0].path}); all bags of a run need one dimension ({rec.where()})"
            )
        kept.append(rec)
    return kept, skipped, (first[1] if first else 0)


def load_bag(path: Path, slide_id: str | None = None) -> dict[str, Any]:
    """Features, coords and (if present) instance labels of one H5 file. Non-finite features are refused
    here too (not only by :func:`validate_bags`): one NaN tile turns every weight NaN after one step."""
    who = f" (bag {slide_id})" if slide_id else ""
    try:
        with h5py.File(path, "r") as f:
            feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
            coords = (
                torch.from_numpy(np.asarray(f["coords"][:], dtype=np.int64))
                if "coords" in f
                else torch.zeros(len(feats), 2, dtype=torch.int64)
            )
            inst = (
                torch.from_numpy(np.asarray(f["instance_labels"][:], dtype=np.int64))
                if "instance_labels" in f
                else None
            )
            tile = float(f["coords"].attrs.get("patch_size_level0", 224)) if "coords" in f else 224.0
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BagManifestError(f"{path}: not a readable feature file ({e}){who}") from e
    finite = torch.isfinite(feats)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite.all(dim=1))[0])
        raise BagManifestError(
            f"{path}: features hold {int((~finite).sum())} non-finite value(s) (NaN/Inf), first at row {row}{who}"
        )
    return {"features": feats, "coords": coords, "instance_labels": inst, "tile_size_l0": tile}


class BagDataset(Dataset):
    """One item per bag: features (N, D), coords (N, 2), label index, task name, instance labels or None."""

    def __init__(self, records: Sequence[BagRecord], classes: Sequence[str]) -> None:
        unknown = sorted({r.label for r in records} - set(classes))
        if unknown:
            raise BagManifestError(f"labels {unknown} are not among the classes {list(classes)}")
        self.records = list(records)
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        item = load_bag(r.path, r.slide_id)
        item.update(label=self.class_index[r.label], task=r.task, slide_id=r.slide_id)
        return item


@dataclass
class PreparedBags:
    """The checked bags of a run (kept, skipped with reasons, feature dimension D) and their class names;
    the runner and the strategies read bags of a task and split through it."""

    records: list[BagRecord]
    skipped: list[SkippedBag]
    in_dim: int
    classes: list[str]

    def bags(self, task: str, split: str) -> list[BagRecord]:
        return [r for r in self.records if r.task == task and r.split == split]

    def loaded(self, records: Sequence[BagRecord], limit: int | None = None) -> list[dict[str, Any]]:
        """The first ``limit`` (default: all) of ``records`` as loaded bags (:class:`BagDataset` items)."""
        ds = BagDataset(records, self.classes)
        return [ds[i] for i in range(len(ds) if limit is None else min(limit, len(ds)))]


class BagDataModule(pl.LightningDataModule):
    """Train/val/test bags of the given tasks (plus an optional replay buffer for the replay baseline)."""

    def __init__(
        self,
        records: Sequence[BagRecord],
        classes: Sequence[str],
        tasks: Sequence[str],
        replay: Sequence[BagRecord] = (),
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.records, self.classes, self.tasks = list(records), list(classes), list(tasks)
        self.replay, self.num_workers, self.seed = list(replay), num_workers, seed

    def _split(self, split: str) -> list[BagRecord]:
        return [r for r in self.records if r.split == split and r.task in self.tasks]

    def _loader(self, records: list[BagRecord], shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            BagDataset(records, self.classes), batch_size=None, shuffle=shuffle, generator=g,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        train = self._split("train") + self.replay
        if not train:
            raise BagManifestError(f"no training bags for tasks {self.tasks}")
        return self._loader(train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), shuffle=False)
