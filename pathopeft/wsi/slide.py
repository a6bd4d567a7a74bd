"""Open whole-slide images: the built-in readers (OpenSlide; tifffile for plain TIFFs) and :func:`open_slide`.

The interface and the registry live in :mod:`pathopeft.wsi.slide_base`; the tile-direct reader for tiled
TIFF/SVS in :mod:`pathopeft.wsi.tiff_direct` (tried first where it applies).

A :class:`Slide` only opens and reads; tissue detection, tiling and models live elsewhere. All read
coordinates are level-0 pixels (OpenSlide's convention), so coordinates written to H5 files mean the same
whatever level was read.

Readers are the entries of :data:`SLIDE_READERS`: a :class:`Slide` subclass registered with
``@SLIDE_READERS.register("name", suffixes=(".ext",), priority=n)`` is tried by :func:`open_slide` for
those suffixes (``None``: any file), lowest ``priority`` first, and its name becomes ``slide.backend``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathopeft.wsi.slide_base import (
    SLIDE_READERS,
    Slide,
    SlideError,
    _read_strip_by_blocks,
    _tiff_page_properties,
)

__all__ = [
    "SLIDE_READERS",
    "OpenSlideSlide",
    "Slide",
    "SlideError",
    "TiffSlide",
    "open_slide",
    "read_at_mpp",
    "readers_for",
]


@SLIDE_READERS.register("openslide", suffixes=None, priority=0)
class OpenSlideSlide(Slide):
    """SVS, NDPI, MRXS, SCN, tiled TIFF … through the OpenSlide library shipped by ``openslide-bin``."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike[str], manifest_mpp: float | None = None) -> None:
        super().__init__(path, manifest_mpp)
        self._osr = self._open()

    def _open(self) -> Any:  # openslide.OpenSlide, imported lazily
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({e})") from e

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return dict(self._osr.properties)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            rgba = self._osr.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))
            )
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: read_region{tuple(location)} at level {level} failed ({e})") from e
        return _rgba_to_rgb(np.asarray(rgba))

    def reopen(self) -> None:
        self.close()
        self._osr = self._open()

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


@SLIDE_READERS.register("tifffile", suffixes=(".tif", ".tiff"), priority=10)
class TiffSlide(Slide):
    """Plain (non-pyramidal, stripped or tiled) RGB TIFFs that OpenSlide refuses.

    The first page is decoded once and held in memory: such files are small by nature (a pyramid would have
    been handled by OpenSlide). Coarser levels are not synthesised; level 0 is the only level.
    """

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike[str], manifest_mpp: float | None = None) -> None:
        super().__init__(path, manifest_mpp)
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[0]
                arr = page.asarray()
                props = _tiff_page_properties(page)
        except Exception as e:
            raise SlideError(f"{self.path}: not a readable TIFF ({type(e).__name__}: {e})") from e
        self._image = _to_rgb(arr, self.path)
        self._props = props

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        h, w = self._image.shape[:2]
        return ((w, h),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level != 0:
            raise SlideError(f"{self.path}: plain TIFF has only level 0, asked for level {level}")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        ih, iw = self._image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA onto white, so empty regions read as background."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(f"{path}: expected an RGB image, got array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        hi = float(arr.max()) or 1.0
        arr = (arr.astype(np.float32) * (255.0 / hi)).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def readers_for(path: str | os.PathLike[str]) -> list[str]:
    """The registered readers that take ``path``'s suffix, in the order :func:`open_slide` tries them."""
    suffix = Path(path).suffix.lower()
    entries = [SLIDE_READERS.entry(n) for n in SLIDE_READERS]
    take = [e for e in entries if e.caps["suffixes"] is None or suffix in e.caps["suffixes"]]
    return [e.name for e in sorted(take, key=lambda e: e.caps["priority"])]


def open_slide(path: str | os.PathLike[str], mpp: float | None = None, threads: int = 1) -> Slide:
    """Open ``path`` with the first registered reader that can read it (see :data:`SLIDE_READERS`).

    Args:
        path: slide file.
        mpp: level-0 µm/px from a manifest, used only when the file's metadata has none.
        threads: decode threads for :meth:`Slide.read_tiles` (``tiff-direct`` uses them; OpenSlide ignores them).

    Raises:
        SlideError: the file is missing, unsupported or unreadable; the message names the file and what
            every reader tried said.
    """
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: no such file")
    errors = []
    for name in readers_for(p):
        try:
            slide = SLIDE_READERS.get(name)(p, mpp)
        except SlideError as e:
            errors.append(str(e))
            continue
        slide.backend = name  # the status files record which reader opened it
        slide.threads = max(1, int(threads))
        return slide
    raise SlideError(f"{p}: unsupported or unreadable slide ({'; '.join(e.split(': ', 1)[-1] for e in errors)})")


def read_at_mpp(
    slide: Slide, mpp: float, strip_px: int = 4096, bad_regions: list[dict] | None = None, block_px: int = 256
) -> tuple[np.ndarray, float]:
    """Whole slide as one RGB array at (about) ``mpp`` µm/px; returns the image and its level-0 downsample.

    Reads the best level in horizontal strips so a large level never sits in memory twice. A strip that cannot
    be decoded is re-read in ``block_px`` blocks: the error then names the real unreadable region, and with a
    ``bad_regions`` list given those regions are collected there and read as background instead of failing.
    """
    from pathopeft.wsi.resolution import choose_level

    level0_mpp = slide.mpp
    if level0_mpp is None:
        raise SlideError(f"{slide.path}: no mpp, cannot read at {mpp} µm/px")
    choice = choose_level(slide.level_downsamples, level0_mpp, max(mpp, level0_mpp))
    lw, lh = slide.level_dimensions[choice.level]
    out_w = max(1, round(lw / choice.resize_factor))
    out_h = max(1, round(lh / choice.resize_factor))
    # shrink in the decoder first where the reader can (8, 4 or 2 times), then the rest with a box filter
    reduce = max([s for s in (8, 4, 2) if s <= choice.resize_factor and strip_px % s == 0], default=1)
    strips = []
    for y in range(0, lh, strip_px):
        h = min(strip_px, lh - y)
        y0 = round(y * choice.level_downsample)
        try:
            strip = slide.read_region_reduced((0, y0), choice.level, (lw, h), reduce)
        except SlideError:
            slide.reopen()
            strip = _read_strip_by_blocks(
                slide, y, choice.level, (lw, h), choice.level_downsample, block_px, bad_regions
            )
        if choice.resize_factor != 1.0:
            sh = max(1, round(out_h * (y + h) / lh) - round(out_h * y / lh))
            strip = np.asarray(Image.fromarray(strip).resize((out_w, sh), Image.BOX))
        strips.append(strip)
    image = np.concatenate(strips, axis=0)
    return image, slide.dimensions[0] / image.shape[1]


# after the built-in readers, so the listing order stays openslide, tifffile, tiff-direct
from pathopeft.wsi import tiff_direct  # noqa: F401  # registers the "tiff-direct" reader
