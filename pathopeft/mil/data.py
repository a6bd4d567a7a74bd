"""Bags for MIL: one feature H5 per slide (the WSI stage's files, CLAM's or TRIDENT's) plus a manifest.

Manifest columns: ``slide_id,path,label,task,split`` (``path`` relative to the CSV; ``label`` a class name;
``task`` the task the bag belongs to; ``split`` train/val/test). Optional: ``thumbnail`` (an RGB picture of
the slide for heatmaps, with ``thumbnail_downsample``) and any other columns (kept in ``extra``).

Bags are served one at a time (``batch_size=None``): N varies from slide to slide and 10^5 instances fit,
because nothing is padded to the largest bag. A ``instance_labels`` dataset in the H5 (0 = benign tile,
1 = tumour) is the localization ground truth when present.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathopeft.errors import UserError

REQUIRED = ("slide_id", "path", "label", "task", "split")


class BagManifestError(UserError, ValueError):
    """A manifest that cannot be used: the message names the file and line."""


@dataclass
class BagRecord:
    slide_id: str
    path: Path
    label: str
    task: str
    split: str
    thumbnail: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


def read_bag_manifest(path: str | Path) -> list[BagRecord]:
    """Parse and check a bag manifest (missing columns, duplicate ids, missing files: one clear error)."""
    path = Path(path)
    if not path.is_file():
        raise BagManifestError(f"{path}: manifest not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise BagManifestError(f"{path}: missing column(s) {missing}; need {list(REQUIRED)}")
        records, seen = [], set()
        for line, row in enumerate(reader, start=2):
            sid = row["slide_id"].strip()
            if sid in seen:
                raise BagManifestError(f"{path}:{line}: duplicate slide_id {sid!r}")
            seen.add(sid)
            h5 = (path.parent / row["path"]).resolve()
            if not h5.is_file():
                raise BagManifestError(f"{path}:{line}: feature file {h5} not found")
            thumb = row.get("thumbnail") or None
            extra = {k: v for k, v in row.items() if k not in (*REQUIRED, "thumbnail")}
            records.append(
                BagRecord(
                    sid,
                    h5,
                    row["label"].strip(),
                    row["task"].strip(),
                    row["split"].strip(),
                    (path.parent / thumb).resolve() if thumb else None,
                    extra,
                )
            )
    return records


def load_bag(path: Path) -> dict[str, Any]:
    """Features, coords and (if present) instance labels of one H5 file."""
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
    except (OSError, KeyError) as e:
        raise OSError(f"{path}: not a readable feature file ({e})") from e
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
        item = load_bag(r.path)
        item.update(label=self.class_index[r.label], task=r.task, slide_id=r.slide_id)
        return item


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
