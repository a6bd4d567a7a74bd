"""Tile features for one slide: a DataLoader over the tile grid feeding a timm backbone.

The slide is opened *inside each worker* on first use (OpenSlide handles must not cross a fork and a
worker that hits a decode error reopens its own handle), tiles are read at the level chosen for the target
mpp and resized once on the CPU, and normalisation, resizing to the model's input size, channels-last and
mixed precision happen on the device in whole batches, in :meth:`pathopeft.backbones.Backbone.embed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pathopeft.backbones import Backbone
from pathopeft.wsi.slide import Slide, SlideError, open_slide
from pathopeft.wsi.tiling import TileGrid

log = logging.getLogger(__name__)


class TileReadError(SlideError):
    """A tile could not be decoded even after reopening the slide."""


class TileDataset(Dataset):
    """Tiles of one slide as uint8 tensors (3, tile_px, tile_px), read lazily in the worker process."""

    def __init__(self, slide_path: str | os.PathLike[str], grid: TileGrid, skip_bad_tiles: bool = False) -> None:
        self.slide_path = str(slide_path)
        self.coords = grid.coords
        self.level = grid.choice.level
        self.read_px = grid.read_px
        self.tile_px = grid.tile_px
        self.skip_bad_tiles = skip_bad_tiles
        self._slide: Slide | None = None
        self._owner: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self) -> Slide:
        owner = os.getpid()
        if self._slide is None or self._owner != owner:  # first use in this process (or after fork)
            self._slide = open_slide(self.slide_path)
            self._owner = owner
        return self._slide

    def _read(self, idx: int) -> np.ndarray:
        x, y = (int(v) for v in self.coords[idx])
        try:
            return self._handle().read_region((x, y), self.level, (self.read_px, self.read_px))
        except SlideError as first:
            # An OpenSlide handle is unusable after a decode error: reopen once, then give up on this tile.
            log.debug("reopening %s after: %s", self.slide_path, first)
            self._handle().reopen()
            try:
                return self._handle().read_region((x, y), self.level, (self.read_px, self.read_px))
            except SlideError as second:
                self._handle().reopen()
                raise TileReadError(f"{self.slide_path}: tile {idx} at ({x}, {y}) unreadable ({second})") from second

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int, bool]:
        try:
            tile = self._read(idx)
        except TileReadError:
            if not self.skip_bad_tiles:
                raise
            return torch.zeros(3, self.tile_px, self.tile_px, dtype=torch.uint8), idx, False
        if self.read_px != self.tile_px:
            tile = np.asarray(
                Image.fromarray(tile).resize((self.tile_px, self.tile_px), Image.BILINEAR, reducing_gap=2.0)
            )
        return torch.from_numpy(np.array(tile, copy=True)).permute(2, 0, 1), idx, True


@torch.inference_mode()
def extract_features(
    slide_path: str | os.PathLike[str],
    grid: TileGrid,
    backbone: Backbone,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "auto",
    skip_bad_tiles: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features for every tile of ``grid``.

    Args:
        slide_path: the slide (re)opened by each worker.
        grid: tiles from :func:`pathopeft.wsi.tiling.tile_grid`.
        backbone: from :func:`pathopeft.backbones.create_backbone`.
        batch_size, num_workers: DataLoader settings (workers decode tiles in parallel).
        device: ``"cuda"``, ``"cpu"``…; default CUDA when available.
        precision: ``"auto"`` | ``"bf16"`` | ``"fp16"`` | ``"fp32"`` (mixed precision only on CUDA).
        skip_bad_tiles: drop tiles that stay unreadable after a reopen instead of failing the slide.
        on_batch: called with the number of tiles after each batch (progress bars).

    Returns:
        ``(features (M, D) float32, coords (M, 2) int64)``; ``M < N`` only when bad tiles were skipped.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = len(grid)
    if n == 0:
        return np.zeros((0, backbone.dim), dtype=np.float32), np.zeros((0, 2), dtype=np.int64)
    backbone.model.to(device).eval()  # Module.to is in place: embed() runs on the model's device
    if device.type == "cuda":
        backbone.model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        TileDataset(slide_path, grid, skip_bad_tiles=skip_bad_tiles),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    feats = np.zeros((n, backbone.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for tiles, idx, valid in loader:
        feats[idx.numpy()] = backbone.embed(tiles, precision).cpu().numpy()
        ok[idx.numpy()] = valid.numpy()
        if on_batch is not None:
            on_batch(len(idx))
    if not ok.all():
        log.warning("%s: skipped %d unreadable tiles", slide_path, int((~ok).sum()))
    return feats[ok], grid.coords[ok]
