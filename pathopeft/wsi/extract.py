"""Tile features for one slide: batches of spatially sorted tiles feeding a timm backbone.

One dataset item is one *batch*: consecutive grid coordinates (row-major, so neighbours share slide tiles)
read by :meth:`pathopeft.wsi.slide.Slide.read_tiles` straight into one uint8 (B, H, W, 3) array (pinned
when the model is on CUDA), so no per-tile tensors, no collate, no RGBA. The tile-direct reader decodes each
slide tile of a batch once (in ``read_threads`` threads) and lets libjpeg shrink it; other readers read region
by region. The slide is opened *inside each worker* on first use (OpenSlide handles must not cross a fork).
Normalisation, resizing to the model's input size, channels-last and mixed precision happen on the device in
whole batches, in :meth:`pathopeft.backbones.Backbone.embed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathopeft.backbones import Backbone
from pathopeft.wsi.slide import Slide, SlideError, open_slide
from pathopeft.wsi.tiling import TileGrid

log = logging.getLogger(__name__)


class TileReadError(SlideError):
    """A tile could not be decoded even after reopening the slide."""


class TileBatches(Dataset):
    """Batches of one slide's tiles: item ``b`` is ``(tiles (B, 3, tile_px, tile_px) uint8, indices, ok)``."""

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        grid: TileGrid,
        batch_size: int = 64,
        skip_bad_tiles: bool = False,
        read_threads: int = 1,
        pin: bool = False,
    ) -> None:
        self.slide_path = str(slide_path)
        self.coords = grid.coords
        self.level = grid.choice.level
        self.read_px = grid.read_px
        self.tile_px = grid.tile_px
        self.batch_size = int(batch_size)
        self.skip_bad_tiles = skip_bad_tiles
        self.read_threads = max(1, int(read_threads))
        self.pin = pin
        self._slide: Slide | None = None
        self._owner: int | None = None

    def __len__(self) -> int:
        return (len(self.coords) + self.batch_size - 1) // self.batch_size

    def handle(self) -> Slide:
        owner = os.getpid()
        if self._slide is None or self._owner != owner:  # first use in this process (or after fork)
            self._slide = open_slide(self.slide_path, threads=self.read_threads)
            self._owner = owner
        return self._slide

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(self.coords))
        shape = (hi - lo, self.tile_px, self.tile_px, 3)
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin and torch.cuda.is_available())
        slide = self.handle()
        _, ok = slide.read_tiles(self.coords[lo:hi], self.level, self.read_px, self.tile_px, out=buf.numpy())
        if not ok.all() and not self.skip_bad_tiles:
            k = int(np.flatnonzero(~ok)[0])
            x, y = (int(v) for v in self.coords[lo + k])
            try:  # read it once more on its own, for the reader's own message
                slide.read_region((x, y), self.level, (self.read_px, self.read_px))
                detail = "unreadable in the batch read"
            except SlideError as e:
                slide.reopen()
                detail = str(e)
            raise TileReadError(f"{self.slide_path}: tile {lo + k} at ({x}, {y}) unreadable ({detail})")
        return buf.permute(0, 3, 1, 2), torch.arange(lo, hi), torch.from_numpy(ok)


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
    read_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Features for every tile of ``grid``.

    Args:
        slide_path: the slide (re)opened by each worker.
        grid: tiles from :func:`pathopeft.wsi.tiling.tile_grid`.
        backbone: from :func:`pathopeft.backbones.create_backbone`.
        batch_size: tiles per batch (one dataset item, read in one ``read_tiles`` call).
        num_workers: DataLoader worker processes (each reads whole batches; 0 reads in this process).
        device: ``"cuda"``, ``"cpu"``…; default CUDA when available.
        precision: ``"auto"`` | ``"bf16"`` | ``"fp16"`` | ``"fp32"`` (mixed precision only on CUDA).
        skip_bad_tiles: drop tiles that stay unreadable after a reopen instead of failing the slide.
        on_batch: called with the number of tiles after each batch (progress bars).
        read_threads: decoder threads per reading process (the tile-direct reader; others ignore it).

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
    cuda = device.type == "cuda"
    batches = TileBatches(slide_path, grid, batch_size, skip_bad_tiles, read_threads, pin=cuda and num_workers == 0)
    loader = DataLoader(
        batches,
        batch_size=None,  # an item is already a batch
        num_workers=num_workers,
        pin_memory=cuda and num_workers > 0,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
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
