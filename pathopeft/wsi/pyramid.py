"""Write an RGB image as a tiled, multi-resolution generic TIFF that OpenSlide opens with its mpp.

Useful to turn a plain (single-level) TIFF or PNG scan into a pyramid that reads fast, and to build test
pyramids with known geometry. Resolution is stored in pixels/cm, which OpenSlide's generic-tiff reader turns
into ``openslide.mpp-x``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_pyramid(
    image: np.ndarray,
    path: str | os.PathLike[str],
    mpp: float,
    levels: int = 4,
    tile: int = 256,
    compression: str = "zlib",
    downsamples: tuple[int, ...] | None = None,
) -> Path:
    """Write ``image`` (H, W, 3 uint8) with ``levels`` levels, each half the size of the previous one.

    Returns the path. Level k has downsample 2**k (rounded to whole pixels), or ``downsamples[k]`` when given
    (``(1, 4, 16, 64)``: Aperio-like, no 2× level, as in real 40× scans).
    """
    import tifffile

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if mpp <= 0 or levels < 1:
        raise ValueError(f"need mpp > 0 and levels >= 1 (got {mpp}, {levels})")
    path = Path(path)
    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for k, ds in enumerate(downsamples or [2**k for k in range(levels)]):
            lw, lh = max(1, round(w / ds)), max(1, round(h / ds))
            arr = image if k == 0 else np.asarray(Image.fromarray(image).resize((lw, lh), Image.BOX))
            level_mpp = mpp * w / lw
            tw.write(
                arr,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
            )
    return path
