"""A grid of square tiles at a target resolution, kept where there is enough tissue.

Tile size and overlap are pixels *at the target mpp*; the coordinates returned are level-0 top-left
corners (the CLAM/TRIDENT convention), and the :class:`TileGrid` also says which level to read and how
many pixels, so readers never re-derive it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pathopeft.wsi.resolution import LevelChoice, choose_level, size_at_level
from pathopeft.wsi.tissue import TissueMask


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile_px`` pixels at ``target_mpp``; read ``read_px`` at ``choice.level`` and resize."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    tile_px: int
    overlap_px: int
    target_mpp: float
    level0_mpp: float
    choice: LevelChoice
    read_px: int
    level0_dimensions: tuple[int, int]

    @property
    def tile_size_l0(self) -> float:
        """Tile side in level-0 pixels (may be fractional when the target is not a multiple of level 0)."""
        return self.tile_px * self.choice.target_downsample

    def __len__(self) -> int:
        return len(self.coords)


def tile_grid(
    level0_dimensions: tuple[int, int],
    level_downsamples: tuple[float, ...],
    level0_mpp: float,
    target_mpp: float,
    tile_px: int = 224,
    overlap_px: int = 0,
    tissue: TissueMask | None = None,
    min_tissue_fraction: float = 0.25,
) -> TileGrid:
    """Lay a regular grid over the slide and keep tiles whose tissue fraction reaches the threshold.

    Only tiles that lie entirely inside the slide are produced (no padded border tiles). Without a tissue
    mask every in-bounds tile is kept.
    """
    if tile_px <= 0:
        raise ValueError(f"tile_px must be > 0, got {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must be in [0, tile_px), got {overlap_px} for tile_px={tile_px}")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
    choice = choose_level(level_downsamples, level0_mpp, target_mpp)
    size_l0 = tile_px * choice.target_downsample
    step_l0 = (tile_px - overlap_px) * choice.target_downsample
    w, h = level0_dimensions
    nx = int(np.floor((w - size_l0) / step_l0)) + 1 if w >= size_l0 else 0
    ny = int(np.floor((h - size_l0) / step_l0)) + 1 if h >= size_l0 else 0
    xs = np.round(np.arange(nx) * step_l0).astype(np.int64)
    ys = np.round(np.arange(ny) * step_l0).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: tiles ordered top-to-bottom, left-to-right
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64).reshape(-1, 2)
    if tissue is not None:
        frac = tissue.tile_fractions(coords, size_l0)
        keep = frac >= min_tissue_fraction if min_tissue_fraction > 0 else np.ones(len(coords), dtype=bool)
        coords, frac = coords[keep], frac[keep]
    else:
        frac = np.ones(len(coords), dtype=np.float32)
    return TileGrid(
        coords=coords,
        tissue_fraction=frac,
        tile_px=tile_px,
        overlap_px=overlap_px,
        target_mpp=target_mpp,
        level0_mpp=level0_mpp,
        choice=choice,
        read_px=size_at_level(tile_px, choice),
        level0_dimensions=(int(w), int(h)),
    )
