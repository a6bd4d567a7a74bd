"""Tiling of segmentation images: the eval tile grid, reflect-padding to the crop size, and stitching tile
predictions back into one full-size map (used by :class:`~pathopeft.seg.data.SegDataset` and
:func:`pathopeft.seg.predict.predict_image`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def tile_starts(length: int, crop: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride`` px, the last one flush with the border."""
    if length <= crop:
        return [0]
    return [*range(0, length - crop, stride), length - crop]


def stitch(tiles: Iterable[tuple[torch.Tensor, int, int]], out_shape: tuple[int, int]) -> torch.Tensor:
    """Average overlapping tile predictions into one (C, H, W) map.

    ``tiles`` yields ``(logits (C, h, w), y, x)``; parts of a tile beyond the image (padding of an image
    smaller than the crop) are dropped. Sum and count are accumulated separately so borders, covered by fewer
    tiles, are exact averages too. Every pixel must be covered.
    """
    height, width = int(out_shape[0]), int(out_shape[1])
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for logits, y0, x0 in tiles:
        y, x = int(y0), int(x0)
        if logits.ndim != 3:
            raise ValueError(f"tile logits must be (C, h, w), got shape {tuple(logits.shape)}")
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"tile origin ({y}, {x}) is outside the {height}×{width} image")
        if total is None or count is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            total = torch.zeros((logits.shape[0], height, width), dtype=dtype, device=logits.device)
            count = torch.zeros((height, width), dtype=dtype, device=logits.device)
        if logits.shape[0] != total.shape[0]:
            raise ValueError(f"tiles disagree on the number of channels: {logits.shape[0]} vs {total.shape[0]}")
        h, w = min(logits.shape[1], height - y), min(logits.shape[2], width - x)
        total[:, y : y + h, x : x + w] += logits[:, :h, :w].to(total)
        count[y : y + h, x : x + w] += 1
    if total is None or count is None:
        raise ValueError("no tiles to stitch")
    uncovered = int((count == 0).sum())
    if uncovered:
        raise ValueError(f"tiles leave {uncovered} of {height * width} pixels uncovered")
    return total / count


def _pad_reflect(
    img: np.ndarray, mask: np.ndarray, crop: int, centre: bool
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Reflect-pad image and mask to at least crop×crop; returns the top/left padding too."""
    h, w = mask.shape
    ph, pw = max(0, crop - h), max(0, crop - w)
    if not (ph or pw):
        return img, mask, 0, 0
    top, left = (ph // 2, pw // 2) if centre else (0, 0)
    pads = ((top, ph - top), (left, pw - left))
    return np.pad(img, (*pads, (0, 0)), mode="reflect"), np.pad(mask, pads, mode="reflect"), top, left
