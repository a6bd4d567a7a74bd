"""Data layer of segmentation fine-tuning: manifests, images and label masks, random crops and eval tiles.

Manifest: a CSV with one row per image. Relative paths are resolved against the CSV's own folder, so a
manifest in ``data_manifests/`` may point at ``../../shared/...``.

=========  ========  ==========================================================================================
column     required  meaning
=========  ========  ==========================================================================================
``image``  yes       RGB image: PNG, JPEG or TIFF (grey is replicated to RGB, alpha is dropped)
``mask``   yes       label image of the same height and width: PNG or TIFF, one channel (JPEG is refused:
                     its compression noise invents labels at every edge)
``split``  yes       ``train``, ``val`` or ``test``. Without ``val`` rows, ``SegDataModule`` holds out a seeded
                     fraction of the train *images* (never single tiles) as validation
``id``     no        unique name (default: the image's file stem)
``group``  no        patient or slide key: the held-out validation fraction is drawn by group, so one
                     patient never straddles train and val
=========  ========  ==========================================================================================

Other columns are kept in ``SegRecord.extra``. Image and mask reading: :mod:`pathopeft.seg.images`; augmentation: :mod:`pathopeft.seg.augment`. Errors name the file and line (``seg.csv:7: duplicate id 'x'``).
``SegDataModule.setup`` decodes every image and mask once (see :meth:`SegDataset.validate`), so an unreadable
file, a colour mask or an illegal label fails before the first training step, not when that image is first
sampled hours later (or never, for a test row).

Mask decoding (``mask_mode``): ``"binary"`` maps every value > 0 to 1 (so {0,255} and {0,1} masks both work;
``n_classes`` must be 2); ``"index"`` keeps the values as class indices, which must lie in ``range(n_classes)``.

Items of ``SegDataset`` are dicts: ``image`` float32 (3, crop, crop) in [0, 1] (normalisation belongs to the
model, which knows its encoder's statistics), ``mask`` int64 (crop, crop), ``index`` (the record's position in
``dataset.records``), ``y``/``x`` (the crop's top-left corner in that image), ``height``/``width`` (the full
image's size, for :func:`~pathopeft.seg.tiling.stitch`).

The tile grid and stitching are :mod:`pathopeft.seg.tiling`; manifests of the shared public datasets are written
by :mod:`pathopeft.datasets.monuseg` and :mod:`pathopeft.datasets.glas`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathopeft.manifest import check_choice, check_unique, read_rows
from pathopeft.seg.augment import Strength, eval_transforms, train_transforms
from pathopeft.seg.images import MaskMode, SegDataError, decode_mask, read_image, read_mask, read_size
from pathopeft.seg.tiling import _pad_reflect, tile_starts

SPLITS = ("train", "val", "test")
REQUIRED = ("image", "mask", "split")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
_REFLECT = cv2.BORDER_REFLECT_101


@dataclass
class SegRecord:
    """One manifest row; ``image`` and ``mask`` are absolute paths; ``manifest``/``line`` say where it came from."""

    id: str
    image: Path
    mask: Path
    split: str
    group: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)

    def located(self, error: SegDataError) -> SegDataError:
        """A copy of ``error`` prefixed with ``manifest:line:``, so a file problem found late still points at its
        row (a new object, so ``raise record.located(e) from e`` never chains ``e`` to itself)."""
        where = f"{self.manifest}:{self.line}: " if self.manifest is not None and self.line is not None else ""
        text = str(error)
        return SegDataError(text if text.startswith(where) else where + text)


# --------------------------------------------------------------------------------------------- manifests


def read_seg_manifest(path: str | os.PathLike[str]) -> list[SegRecord]:
    """Parse and check a segmentation manifest; every problem is one clear error naming file and line."""
    rows = read_rows(path, REQUIRED, optional=("id", "group"), error=SegDataError)
    records: list[SegRecord] = []
    for row in rows:
        split = check_choice(row, "split", SPLITS, SegDataError)
        files = {}
        for kind, suffixes in (("image", IMAGE_SUFFIXES), ("mask", MASK_SUFFIXES)):
            file = row.path(kind)
            if not file.is_file():
                raise SegDataError(f"{row.where}: {kind} file {file} not found")
            if file.suffix.lower() not in suffixes:
                raise SegDataError(f"{row.where}: {kind} file {file} must be one of {list(suffixes)}")
            files[kind] = file
        extra = {k: v for k, v in row.values.items() if k not in (*REQUIRED, "id", "group")}
        rid = row.get("id") or files["image"].stem
        records.append(
            SegRecord(rid, files["image"], files["mask"], split, row.get("group"), extra, row.manifest, row.line)
        )
    check_unique(rows, "id", [r.id for r in records], SegDataError)
    return records


def split_train_val(
    records: Sequence[SegRecord], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[SegRecord], list[SegRecord], list[SegRecord]]:
    """(train, val, test) records. Explicit ``val`` rows win; otherwise a seeded fraction of train images
    (or of their ``group``s, when given) becomes val, so no image — and no patient — is in both."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    test = [r for r in records if r.split == "test"]
    if val or val_fraction == 0 or len(train) < 2:
        return train, val, test
    units = sorted({r.group or r.id for r in train})
    if len(units) < 2:
        return train, val, test
    n_val = min(max(1, round(val_fraction * len(units))), len(units) - 1)
    held = set(np.random.default_rng(seed).permutation(units)[:n_val].tolist())
    return [r for r in train if (r.group or r.id) not in held], [r for r in train if (r.group or r.id) in held], test


# ------------------------------------------------------------------------------------------ decoding


class SegDataset(Dataset):
    """Random crops (``train=True``) or a fixed overlapping tile grid (``train=False``) of labelled images.

    Train: ``samples_per_epoch`` items (default one per image), item ``i`` a random ``crop``×``crop`` window of
    image ``i % len(records)`` (reflect-padded if the image is smaller), then ``aug``. ``y``/``x`` is the window's
    origin before augmentation (negative where it starts in the padding).
    Eval: one item per tile of the grid ``tile_starts(H, crop, stride)`` × ``tile_starts(W, crop, stride)``
    (``stride`` default ``crop // 2``); ``self.tiles[i] == (index, y, x)``, and :func:`~pathopeft.seg.tiling.stitch`
    reassembles them.

    Image and mask sizes are checked from the headers at construction; pixels are decoded by :meth:`validate`
    (which ``SegDataModule.setup`` calls) or on first use and, with ``cache=True``, kept (uint8, ~4 MB per 1000²
    image) — otherwise only the last image is kept, which still serves consecutive eval tiles. Random crops draw
    from a generator seeded per process from ``torch.initial_seed()``, so DataLoader workers differ and
    ``seed_everything`` makes runs repeatable.
    """

    def __init__(
        self,
        records: Sequence[SegRecord],
        n_classes: int,
        mask_mode: MaskMode = "binary",
        crop: int = 256,
        train: bool = False,
        aug: A.Compose | None = None,
        *,
        stride: int | None = None,
        samples_per_epoch: int | None = None,
        cache: bool = True,
    ) -> None:
        if mask_mode not in ("binary", "index"):
            raise ValueError(f"mask_mode must be 'binary' or 'index', got {mask_mode!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be ≥ 2 (background counts), got {n_classes}")
        if mask_mode == "binary" and n_classes != 2:
            raise ValueError(f"mask_mode='binary' gives 2 classes, but n_classes={n_classes}")
        if crop < 1:
            raise ValueError(f"crop must be ≥ 1, got {crop}")
        self.stride = max(1, crop // 2) if stride is None else stride
        if not 1 <= self.stride <= crop:
            raise ValueError(f"stride must be in [1, crop={crop}], got {stride}")
        if samples_per_epoch is not None and samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch must be ≥ 0, got {samples_per_epoch}")
        self.records = list(records)
        self.n_classes, self.mask_mode, self.crop, self.train, self.aug = n_classes, mask_mode, crop, train, aug
        self.samples_per_epoch, self.cache = samples_per_epoch, cache
        self.sizes: list[tuple[int, int]] = []
        for r in self.records:
            try:
                size, mask_size = read_size(r.image), read_size(r.mask)
            except SegDataError as e:
                raise r.located(e) from e
            if size != mask_size:
                raise r.located(
                    SegDataError(
                        f"image {r.image} is {size[0]}×{size[1]} (H×W) but mask {r.mask} is "
                        f"{mask_size[0]}×{mask_size[1]}"
                    )
                )
            self.sizes.append(size)
        self.tiles: list[tuple[int, int, int]] = [
            (i, y, x)
            for i, (h, w) in enumerate(self.sizes)
            for y in tile_starts(h, crop, self.stride)
            for x in tile_starts(w, crop, self.stride)
        ]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        if self.train:
            if not self.records:
                return 0
            return len(self.records) if self.samples_per_epoch is None else self.samples_per_epoch
        return len(self.tiles)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of record ``index``: the ``out_shape`` for :func:`~pathopeft.seg.tiling.stitch`."""
        return self.sizes[index]

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.records[index]
        try:
            img = read_image(r.image)
            mask = decode_mask(read_mask(r.mask), self.n_classes, self.mask_mode, r.mask)
            if img.shape[:2] != mask.shape:  # headers agreed, pixels did not (odd multi-series TIFF)
                raise SegDataError(f"image {r.image} decodes to {img.shape[:2]} but mask {r.mask} to {mask.shape}")
        except SegDataError as e:
            raise r.located(e) from e
        return img, mask

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (H, W, 3) uint8 image and (H, W) class-index mask of record ``index``."""
        if index in self._cache:
            return self._cache[index]
        img, mask = self._decode(index)
        if not self.cache:
            self._cache.clear()
        self._cache[index] = (img, mask)
        return img, mask

    def validate(self, keep: bool | None = None) -> None:
        """Decode every image and mask once now, so a bad file fails before training instead of when sampled.

        Checks decodability, a one-channel mask, matching sizes and legal label values. ``keep`` (default
        ``cache``) keeps the decoded pixels, so validation costs no second decode; ``keep=False`` checks and
        drops them (for a split the current stage does not use).
        """
        keep = self.cache if keep is None else keep
        for i in range(len(self.records)):
            if keep:
                self.load(i)
            elif i not in self._cache:
                self._decode(i)

    def full_mask(self, index: int) -> torch.Tensor:
        """The whole ground-truth mask (H, W) int64 of record ``index``, to score stitched predictions."""
        return torch.from_numpy(self.load(index)[1].astype(np.int64))

    def preload(self) -> None:
        """Decode every image now (before DataLoader workers fork, so they share one copy)."""
        if self.cache:
            for i in range(len(self.records)):
                self.load(i)

    def reseed(self, seed: int) -> None:
        """Restart the crop generator and ``aug``'s own generator (albumentations ignores global seeds)."""
        self._rng = np.random.default_rng(seed)
        self._rng_pid = os.getpid()
        if self.aug is not None and hasattr(self.aug, "set_random_seed"):
            self.aug.set_random_seed(seed % 2**32)

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():  # first use in this (worker) process
            self.reseed(torch.initial_seed())
        assert self._rng is not None
        return self._rng

    def _augment(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.aug is None:
            return img, mask
        out = self.aug(image=np.ascontiguousarray(img), mask=np.ascontiguousarray(mask))
        img, mask = out["image"], out["mask"]
        if img.shape[:2] != (self.crop, self.crop) or mask.shape != (self.crop, self.crop):
            raise SegDataError(
                f"aug returned image {img.shape} / mask {mask.shape}, expected {self.crop}×{self.crop}: "
                "augmentations must keep the crop size"
            )
        return img, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        c = self.crop
        if self.train:
            index = i % len(self.records)
            rng = self._generator()  # (re)seeds aug too on first use in this process
            img, mask = self.load(index)
            img, mask, top, left = _pad_reflect(img, mask, c, centre=True)
            y, x = int(rng.integers(0, mask.shape[0] - c + 1)), int(rng.integers(0, mask.shape[1] - c + 1))
            img, mask = self._augment(img[y : y + c, x : x + c], mask[y : y + c, x : x + c])
            y, x = y - top, x - left
        else:
            index, y, x = self.tiles[i]
            img, mask = self.load(index)
            img, mask, _, _ = _pad_reflect(img[y : y + c, x : x + c], mask[y : y + c, x : x + c], c, centre=False)
            img, mask = self._augment(img, mask)
        height, width = self.sizes[index]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0),
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.int64)),
            "index": index,
            "y": y,
            "x": x,
            "height": height,
            "width": width,
        }


# ------------------------------------------------------------------------------------------ datamodule


class SegDataModule(pl.LightningDataModule):
    """Train crops, val/test tiles from one manifest (val held out by image when the manifest has none).

    ``check_files`` (default on) decodes every image and mask of all splits in the first ``setup``, so bad input
    fails before training; turn it off only for a dataset too large to decode up front (headers are still read).
    """

    def __init__(
        self,
        manifest: str,
        n_classes: int = 2,
        mask_mode: MaskMode = "binary",
        crop: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        stride: int | None = None,
        samples_per_epoch: int | None = None,
        crops_per_image: int = 8,
        aug_strength: Strength = "default",
        cache: bool = True,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.manifest, self.n_classes, self.mask_mode, self.crop = manifest, n_classes, mask_mode, crop
        self.batch_size, self.num_workers, self.val_fraction, self.seed = batch_size, num_workers, val_fraction, seed
        self.stride, self.samples_per_epoch, self.crops_per_image = stride, samples_per_epoch, crops_per_image
        self.aug_strength, self.cache, self.check_files = aug_strength, cache, check_files
        self.train_records: list[SegRecord] = []
        self.val_records: list[SegRecord] = []
        self.test_records: list[SegRecord] = []
        self.train_set: SegDataset | None = None
        self.val_set: SegDataset | None = None
        self.test_set: SegDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and split the manifest once, build the three datasets and (``check_files``) decode every record.

        All three splits are checked on the first call, whatever the stage, so a broken test image stops ``fit``
        before it trains; pixels are kept (with ``cache``) only for the splits this stage reads.
        """
        if self.train_set is None:
            records = read_seg_manifest(self.manifest)
            self.train_records, self.val_records, self.test_records = split_train_val(
                records, self.val_fraction, self.seed
            )
            common = {"n_classes": self.n_classes, "mask_mode": self.mask_mode, "crop": self.crop}
            n = self.samples_per_epoch
            self.train_set = SegDataset(
                self.train_records,
                train=True,
                aug=train_transforms(self.crop, self.aug_strength),
                samples_per_epoch=self.crops_per_image * len(self.train_records) if n is None else n,
                cache=self.cache,
                **common,
            )
            self.val_set = SegDataset(
                self.val_records, aug=eval_transforms(), stride=self.stride, cache=self.cache, **common
            )
            self.test_set = SegDataset(
                self.test_records, aug=eval_transforms(), stride=self.stride, cache=self.cache, **common
            )
            if self.check_files:
                used = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
                for name in ("train", "val", "test"):
                    ds = getattr(self, f"{name}_set")
                    ds.validate(keep=self.cache and (stage is None or name in used.get(stage, ())))
        if self.num_workers > 0:  # decode before workers fork: one shared copy instead of one per worker
            sets = {"fit": (self.train_set, self.val_set), "validate": (self.val_set,), "test": (self.test_set,)}
            for ds in sets.get(stage or "", ()):
                if ds is not None:
                    ds.preload()

    def _loader(self, ds: SegDataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() first")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(ds) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_records:
            raise SegDataError(f"{self.manifest}: no train rows")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set, train=False) if self.val_records else []

    def test_dataloader(self) -> DataLoader:
        if not self.test_records:
            raise SegDataError(f"{self.manifest}: no test rows")
        return self._loader(self.test_set, train=False)
