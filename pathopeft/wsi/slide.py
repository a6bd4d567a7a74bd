"""Open whole-slide images behind one small interface: OpenSlide first, tifffile for plain TIFFs.

A :class:`Slide` only opens and reads; tissue detection, tiling and models live elsewhere. All read
coordinates are level-0 pixels (OpenSlide's convention), so coordinates written to H5 files mean the same
whatever level was read.

Readers are the entries of :data:`SLIDE_READERS`: a :class:`Slide` subclass registered with
``@SLIDE_READERS.register("name", suffixes=(".ext",), priority=n)`` is tried by :func:`open_slide` for
those suffixes (``None``: any file), lowest ``priority`` first, and its name becomes ``slide.backend``.
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

    def resample_filter(self, level: int, read_px: int, out_px: int) -> str:
        """The filter :meth:`read_tiles` shrinks with (recorded in the feature files' attributes)."""
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


def _tiff_page_properties(page: Any) -> dict[str, str]:  # page: tifffile.TiffPage
    props = {"openslide.vendor": "plain-tiff"}
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = tags["ResolutionUnit"].value
        props["tiff.XResolution"] = str(num / den if den else 0.0)
        props["tiff.ResolutionUnit"] = {2: "inch", 3: "centimeter"}.get(int(unit), "none")
    return props


def readers_for(path: str | os.PathLike[str]) -> list[str]:
    """The registered readers that take ``path``'s suffix, in the order :func:`open_slide` tries them."""
    suffix = Path(path).suffix.lower()
    entries = [SLIDE_READERS.entry(n) for n in SLIDE_READERS]
    take = [e for e in entries if e.caps["suffixes"] is None or suffix in e.caps["suffixes"]]
    return [e.name for e in sorted(take, key=lambda e: e.caps["priority"])]


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open ``path`` with the first registered reader that can read it (see :data:`SLIDE_READERS`).

    Args:
        path: slide file.
        mpp: level-0 µm/px from a manifest, used only when the file's metadata has none.

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
        return slide
    raise SlideError(f"{p}: unsupported or unreadable slide ({'; '.join(e.split(': ', 1)[-1] for e in errors)})")


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


from pathopeft.wsi import tiff_direct  # noqa: F401  # registers the "tiff-direct" reader
