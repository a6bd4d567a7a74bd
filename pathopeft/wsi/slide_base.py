"""The slide interface every reader implements, the reader registry, and helpers readers share.

Kept apart from :mod:`pathopeft.wsi.slide` (which holds the built-in readers and :func:`open_slide`) so a
reader in its own module (``tiff_direct``) can subclass :class:`Slide` and register itself without an import
cycle.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from typing_extensions import Self

from pathopeft.errors import UserError
from pathopeft.registry import Registry
from pathopeft.wsi.resolution import MppInfo, resolve_mpp


class SlideError(UserError, RuntimeError):
    """A slide could not be opened or read; the message always names the file."""


class Slide(ABC):
    """Read-only access to a pyramidal (or single-level) slide; ``backend`` is the reader that opened it."""

    backend: str = "abstract"
    #: decode threads one :meth:`read_tiles` call may use; readers that decode in one library call ignore it.
    threads: int = 1

    def __init__(self, path: str | os.PathLike[str], manifest_mpp: float | None = None) -> None:
        self.path = Path(path)
        self.manifest_mpp = manifest_mpp

    # --- geometry -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""

    @property
    @abstractmethod
    def properties(self) -> Mapping[str, str]:
        """Vendor/TIFF metadata as OpenSlide-style string properties."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp_info(self) -> MppInfo:
        """Level-0 µm/px and where it came from (metadata first, manifest as fallback)."""
        return resolve_mpp(self.properties, self.manifest_mpp)

    @property
    def mpp(self) -> float | None:
        return self.mpp_info.mpp

    # --- pixels ---------------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` pixels at ``level``, top-left at level-0 ``location``.

        Regions reaching past the slide border are padded with white (background), as OpenSlide does.
        """

    def read_tiles(
        self, coords: np.ndarray, level: int, read_px: int, out_px: int, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Square tiles: ``read_px`` level pixels at each level-0 ``coords[i]``, shrunk to ``out_px``, written
        into ``out[i]`` (N, out_px, out_px, 3) uint8 (allocated when None). Returns ``(out, ok)``: ``ok[i]`` False
        for a tile that could not be decoded (its pixels are 0). Readers that can do better (decode each slide
        tile once, shrink in the decoder) override this; this default reads region by region and resizes with
        :meth:`resample_filter`'s filter.
        """
        n = len(coords)
        out = np.empty((n, out_px, out_px, 3), np.uint8) if out is None else out
        ok = np.ones(n, dtype=bool)
        for k, (x, y) in enumerate(coords):
            try:
                tile = self.read_region((int(x), int(y)), level, (read_px, read_px))
            except SlideError:
                self.reopen()
                try:
                    tile = self.read_region((int(x), int(y)), level, (read_px, read_px))
                except SlideError:
                    self.reopen()
                    ok[k] = False
                    out[k] = 0
                    continue
            if read_px != out_px:
                tile = np.asarray(Image.fromarray(tile).resize((out_px, out_px), Image.BILINEAR, reducing_gap=2.0))
            out[k] = tile
        return out, ok

    def read_region_reduced(
        self, location: tuple[int, int], level: int, size: tuple[int, int], scale: int
    ) -> np.ndarray:
        """``read_region`` shrunk ``scale`` times (area filter); readers that decode at reduced size override it."""
        region = self.read_region(location, level, size)
        if scale == 1:
            return region
        h, w = region.shape[:2]
        return np.asarray(Image.fromarray(region).resize((-(-w // scale), -(-h // scale)), Image.BOX))

    def resample_filter(self, level: int, read_px: int, out_px: int, coords: np.ndarray | None = None) -> str:
        """The filter :meth:`read_tiles` shrinks tiles at level-0 ``coords`` with (recorded in the feature files'
        attributes; a reader whose filter depends on where tiles start uses ``coords``)."""
        return "none" if read_px == out_px else "pil-bilinear-reducing-gap-2"

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size`` pixels (read from the best level)."""
        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_size
        level = max(i for i, d in enumerate(self.level_downsamples) if d <= max(ds, 1.0))
        lw, lh = self.level_dimensions[level]
        try:
            region = self.read_region((0, 0), level, (lw, lh))
        except SlideError:  # a picture: undecodable parts show as background
            self.reopen()
            region = _read_strip_by_blocks(self, 0, level, (lw, lh), self.level_downsamples[level], 256, [])
        scale = min(1.0, max_size / max(lw, lh))
        if scale < 1.0:
            img = Image.fromarray(region).resize((max(1, round(lw * scale)), max(1, round(lh * scale))), Image.BOX)
            region = np.asarray(img)
        return region

    def reopen(self) -> None:  # noqa: B027 - a no-op for in-memory backends
        """Drop and reopen the underlying handle (an OpenSlide handle is unusable after a decode error)."""

    def close(self) -> None:  # noqa: B027 - a no-op for in-memory backends
        """Release the underlying file handle."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dims={self.dimensions}, levels={self.level_count})"


#: Slide readers by name: ``suffixes`` (lower-case, with the dot; ``None`` = any file) and ``priority``
#: (lower is tried first; ties keep registration order). Every reader raises :class:`SlideError` on a file
#: it cannot read, so the next one gets a try.
SLIDE_READERS: Registry[type[Slide]] = Registry("slide reader", {"suffixes": None, "priority": 0})


def _tiff_page_properties(page: Any) -> dict[str, str]:  # page: tifffile.TiffPage
    props = {"openslide.vendor": "plain-tiff"}
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = tags["ResolutionUnit"].value
        props["tiff.XResolution"] = str(num / den if den else 0.0)
        props["tiff.ResolutionUnit"] = {2: "inch", 3: "centimeter"}.get(int(unit), "none")
    return props


def _read_strip_by_blocks(
    slide: Slide,
    y0_level: int,
    level: int,
    size: tuple[int, int],
    downsample: float,
    block_px: int,
    bad_regions: list[dict] | None,
) -> np.ndarray:
    """Re-read a strip that failed in blocks, to find the unreadable part and (if tolerated) keep the rest.

    Unreadable blocks become white (background). With ``bad_regions`` None the first one raises, naming its
    level-0 rectangle; otherwise each is appended as ``{"x", "y", "w", "h", "error"}`` in level-0 pixels.
    """
    lw, h = size
    strip = np.full((h, lw, 3), 255, dtype=np.uint8)
    for bx in range(0, lw, block_px):
        for by in range(0, h, block_px):
            w_, h_ = min(block_px, lw - bx), min(block_px, h - by)
            x_l0, y_l0 = round(bx * downsample), round((y0_level + by) * downsample)
            try:
                strip[by : by + h_, bx : bx + w_] = slide.read_region((x_l0, y_l0), level, (w_, h_))
            except SlideError as e:
                slide.reopen()  # an OpenSlide handle is unusable after a decode error
                region = {"x": x_l0, "y": y_l0, "w": round(w_ * downsample), "h": round(h_ * downsample)}
                cause = str(e).split(" failed (", 1)[-1].rstrip(")")
                where = (
                    f"x {region['x']}–{region['x'] + region['w']}, y {region['y']}–{region['y'] + region['h']} "
                    f"(level-0 px, read at level {level})"
                )
                if bad_regions is None:
                    raise SlideError(
                        f"{slide.path}: unreadable region {where}: {cause}; --skip-bad-tiles treats it as background"
                    ) from e
                bad_regions.append({**region, "error": f"{where}: {cause}"})
    return strip
