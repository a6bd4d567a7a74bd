"""Tiny builders for fast tests (no real data needed)."""

from __future__ import annotations

import numpy as np

from pathopeft.backbones import Backbone, create_backbone

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "img_size": 32,
    "patch_size": 16,
    "depth": 1,
    "embed_dim": 32,
    "num_heads": 2,
}


def tiny_backbone() -> Backbone:
    """A 1-block ViT on 32-px inputs: features of dimension 32 in milliseconds."""
    kw = dict(TINY_VIT)
    return create_backbone(kw.pop("name"), **kw)


def blob_image(h: int = 400, w: int = 600, blobs: tuple[tuple[int, int, int], ...] = ((200, 300, 120),)) -> np.ndarray:
    """White background with pink (H&E-like) discs at (row, col, radius)."""
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for r0, c0, rad in blobs:
        disc = (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2
        img[disc] = (200, 90, 160)
    return img
