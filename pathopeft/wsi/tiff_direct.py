"""Tiled TIFF-family slides (Aperio SVS, generic pyramidal TIFF) read straight from their tiles.

Why not OpenSlide for these: OpenSlide decodes every JPEG tile a region touches again for each neighbouring
region, returns premultiplied RGBA, and cannot decode at reduced size. Here each slide tile is read with one
``os.pread`` from tifffile's offsets, decoded once by libjpeg-turbo (OpenCV) into a bounded cache, and
decoded at 1/2, 1/4 or 1/8 size by the decoder's DCT scaling when the caller wants a level shrunk by that
factor (an area-like downscale for the price of a quarter of the decode). Other compressions (JPEG 2000, LZW,
deflate, none) go through tifffile's own decoders (imagecodecs). Anything else (planar, non-8-bit, non-RGB,
non-tiled levels) is refused with :class:`SlideError`, so :func:`open_slide` falls back to OpenSlide.

Colour: Aperio writes JPEG tiles whose TIFF photometric is RGB with no JFIF/Adobe marker; libjpeg would
apply a YCbCr transform to them. As tifffile does (decode with colorspace RGB), we mark such streams as
untransformed (an Adobe APP14 segment with transform 0 in the stream handed to the decoder); YCbCr tiles
decode as they are. Pixels then equal OpenSlide's (and tifffile's) decode exactly at full size.

Metadata (mpp, vendor, objective power) comes from OpenSlide's properties when OpenSlide opens the file, so
both readers agree on the resolution; from the TIFF tags otherwise.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pathopeft.wsi.slide_base import SLIDE_READERS, Slide, SlideError, _tiff_page_properties

#: The DCT scaling factors libjpeg offers (OpenCV's IMREAD_REDUCED_COLOR_2/4/8).
JPEG_SCALES = (1, 2, 4, 8)

_ADOBE_RGB = b"\xff\xee" + struct.pack(">H", 14) + b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
_DIRECT = {"JPEG", "APERIO_JP2000_RGB", "APERIO_JP2000_YCBC", "JPEG2000", "LZW", "ADOBE_DEFLATE", "DEFLATE", "NONE"}


class _Level:
    """One pyramid level: its page's tile layout and how its tiles decode."""

    def __init__(self, page: Any, path: os.PathLike[str]) -> None:  # page: tifffile.TiffPage
        if not page.is_tiled:
            raise SlideError(f"{path}: level page {page.index} is not tiled")
        if page.compression.name not in _DIRECT:
            raise SlideError(f"{path}: {page.compression.name} tiles are left to OpenSlide")
        if page.dtype != np.uint8 or page.planarconfig.name != "CONTIG" or page.samplesperpixel not in (3, 4):
            raise SlideError(f"{path}: page {page.index} is not 8-bit interleaved RGB")
        if page.photometric.name not in ("RGB", "YCBCR"):
            raise SlideError(f"{path}: photometric {page.photometric.name} is left to OpenSlide")
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.across = -(-self.width // self.tile_w)
        self.down = -(-self.height // self.tile_h)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.jpeg = page.compression.name == "JPEG"
        self.tables = bytes(page.jpegtables or b"") if self.jpeg else b""
        self.rgb_jpeg = self.jpeg and page.photometric.name == "RGB"


@SLIDE_READERS.register("tiff-direct", suffixes=(".svs", ".tif", ".tiff"), priority=-10)
class DirectTiffSlide(Slide):
    """Reads tiles of tiled pyramidal TIFF/SVS levels directly; see the module docstring.

    ``cache_mib`` bounds the decoded-tile cache (shared by all levels and scales); ``threads`` decode tiles of
    one :meth:`read_tiles` call in parallel (the decoders release the GIL).
    """

    backend = "tiff-direct"

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest_mpp: float | None = None,
        cache_mib: int = 256,
        threads: int = 1,
    ) -> None:
        super().__init__(path, manifest_mpp)
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as e:
            raise SlideError(f"{self.path}: not a TIFF ({type(e).__name__}: {e})") from e
        try:
            series = self._tif.series[0]
            self._levels = [_Level(lv.pages[0], self.path) for lv in series.levels]
            if series.kind not in ("svs", "generic", "ome", "shaped", "uniform") or not self._levels:
                raise SlideError(f"{self.path}: tifffile series kind {series.kind!r} is left to OpenSlide")
            self._props = self._read_properties()
        except SlideError:
            self._tif.close()
            raise
        except Exception as e:
            self._tif.close()
            raise SlideError(f"{self.path}: unreadable TIFF structure ({type(e).__name__}: {e})") from e
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, int(cache_mib) * 2**20
        self._lock = threading.Lock()
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None

    # --- geometry and metadata ----------------------------------------------------------------------
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.level_dimensions[0]
        return tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in self._levels)  # as OpenSlide computes them

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    def _read_properties(self) -> dict[str, str]:
        import openslide

        try:
            osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError):  # OpenSlide cannot open it: the TIFF tags are all there is
            return _tiff_page_properties(self._levels[0].page)
        with osr:
            if tuple(osr.level_dimensions) != self.level_dimensions:
                raise SlideError(f"{self.path}: OpenSlide sees other levels; left to OpenSlide")
            return dict(osr.properties)

    # --- decoding -------------------------------------------------------------------------------------
    def _raw(self, lv: _Level, index: int) -> bytes:
        n = int(lv.counts[index])
        if n == 0:
            return b""
        data = os.pread(self._fd, n, int(lv.offsets[index]))
        if len(data) != n:
            raise SlideError(f"{self.path}: tile {index} is truncated ({len(data)} of {n} bytes)")
        return data

    def _decode(self, level: int, index: int, scale: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as RGB uint8 (tile_h/scale, tile_w/scale, 3), white where empty."""
        lv = self._levels[level]
        data = self._raw(lv, index)
        th, tw = -(-lv.tile_h // scale), -(-lv.tile_w // scale)
        if not data:
            return np.full((th, tw, 3), 255, np.uint8)
        try:
            if lv.jpeg:
                tile = _decode_jpeg(data, lv.tables, lv.rgb_jpeg, scale)
            else:
                tile = lv.page.decode(data, index)[0]
                tile = np.asarray(tile).reshape(lv.tile_h, lv.tile_w, -1)[..., :3]
                if scale > 1:
                    tile = _area(tile, th, tw)
        except Exception as e:
            raise SlideError(f"{self.path}: tile {index} of level {level} undecodable ({e})") from e
        if tile.shape[:2] != (th, tw):
            raise SlideError(f"{self.path}: tile {index} of level {level} decoded to {tile.shape[:2]}, not {(th, tw)}")
        return tile

    def _tile(self, level: int, index: int, scale: int) -> np.ndarray:
        key = (level, index, scale)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        tile = self._decode(level, index, scale)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        return tile

    def _tiles_for(self, level: int, x: int, y: int, w: int, h: int) -> list[int]:
        """Indices of the tiles of ``level`` that the level-pixel rectangle touches (inside the level)."""
        lv = self._levels[level]
        x0, x1 = max(x, 0), min(x + w, lv.width)
        y0, y1 = max(y, 0), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return []
        cols = range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1)
        return [r * lv.across + c for r in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1) for c in cols]

    def _paste(
        self,
        out: np.ndarray,
        level: int,
        x: int,
        y: int,
        scale: int,
        tiles: dict[int, np.ndarray] | None = None,
        indices: list[int] | None = None,
    ) -> None:
        """Fill ``out`` (h, w, 3) with the level-pixel region at (x, y) decoded at 1/``scale``; white outside.
        ``tiles`` / ``indices``: the decoded tiles and the region's tile indices when the caller has them."""
        lv = self._levels[level]
        h, w = out.shape[:2]
        tw, th = lv.tile_w // scale, lv.tile_h // scale
        sx, sy = x // scale, y // scale  # the region's origin in scaled pixels (x, y multiples of scale)
        lw, lh = -(-lv.width // scale), -(-lv.height // scale)
        if sx < 0 or sy < 0 or sx + w > lw or sy + h > lh:
            out.fill(255)  # only a region reaching past the level needs background
        for index in indices if indices is not None else self._tiles_for(level, x, y, w * scale, h * scale):
            r, c = divmod(index, lv.across)
            tile = tiles[index] if tiles is not None else self._tile(level, index, scale)
            ty0, tx0 = r * th, c * tw
            y0, y1 = max(sy, ty0), min(sy + h, ty0 + th, lh)
            x0, x1 = max(sx, tx0), min(sx + w, tx0 + tw, lw)
            if y1 > y0 and x1 > x0:
                out[y0 - sy : y1 - sy, x0 - sx : x1 - sx] = tile[y0 - ty0 : y1 - ty0, x0 - tx0 : x1 - tx0]

    # --- the Slide interface -----------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        w, h = int(size[0]), int(size[1])
        x, y = self._level_xy(location, level)
        out = np.empty((h, w, 3), np.uint8)
        self._paste(out, level, x, y, 1)
        return out

    def read_region_reduced(
        self, location: tuple[int, int], level: int, size: tuple[int, int], scale: int
    ) -> np.ndarray:
        """``read_region`` shrunk by ``scale``: decoded at 1/``scale`` on JPEG levels (a thumbnail of a 30k² slide
        decodes 1/64 of its pixels at scale 8), else read in full and area-resized."""
        x, y = self._level_xy(location, level)
        w, h = int(size[0]), int(size[1])
        if not self._dct_applies(level, scale, [(x, y)]):
            return super().read_region_reduced(location, level, size, scale)
        out = np.empty((-(-h // scale), -(-w // scale), 3), np.uint8)
        self._paste(out, level, x, y, scale)
        return out

    def _dct_applies(self, level: int, scale: int, origins: Sequence[tuple[int, int]] = ()) -> bool:
        """libjpeg can shrink ``level`` by ``scale``: a JPEG level, tiles divisible by it, and every region
        starting on its lattice (DCT-scaled pixels start on multiples of the scale)."""
        lv = self._levels[level]
        return (
            lv.jpeg
            and scale in JPEG_SCALES[1:]
            and not (lv.tile_w % scale or lv.tile_h % scale)
            and not any(x % scale or y % scale for x, y in origins)
        )

    def _level_xy(self, location: Sequence[int], level: int) -> tuple[int, int]:
        """Level-0 ``location`` as the nearest pixel of ``level``."""
        ds = self.level_downsamples[level]
        return round(int(location[0]) / ds), round(int(location[1]) / ds)

    def decode_scale(self, level: int, read_px: int, out_px: int, coords: np.ndarray | None = None) -> int:
        """The DCT scale that turns ``read_px`` level pixels into ``out_px`` for tiles at level-0 ``coords``
        (1 when none applies exactly)."""
        origins = [self._level_xy(c, level) for c in coords] if coords is not None else ()
        return self._scale(level, read_px, out_px, origins)

    def _scale(self, level: int, read_px: int, out_px: int, origins: Sequence[tuple[int, int]]) -> int:
        if out_px <= 0 or read_px % out_px:
            return 1
        scale = read_px // out_px
        return scale if self._dct_applies(level, scale, origins) else 1

    def read_tiles(
        self, coords: np.ndarray, level: int, read_px: int, out_px: int, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Square tiles at level-0 ``coords`` into ``out`` (N, out_px, out_px, 3); see :meth:`Slide.read_tiles`.

        The slide tiles the batch touches are decoded first (in parallel with ``threads``, each once, at the
        DCT scale when ``read_px / out_px`` is 2, 4 or 8 and every tile starts on that scale's lattice), then
        every output tile is sliced from the cache (or area-resized from a full-size block otherwise).
        """
        n = len(coords)
        out = np.empty((n, out_px, out_px, 3), np.uint8) if out is None else out
        ok = np.ones(n, dtype=bool)
        origins = [self._level_xy(c, level) for c in coords]
        scale = self._scale(level, read_px, out_px, origins)
        touched = [self._tiles_for(level, x, y, read_px, read_px) for x, y in origins]
        tiles, bad = self._warm(level, list(dict.fromkeys(i for t in touched for i in t)), scale)
        block = np.empty((read_px, read_px, 3), np.uint8) if scale == 1 and read_px != out_px else None
        for k, (x, y) in enumerate(origins):
            if bad and not bad.keys().isdisjoint(touched[k]):
                ok[k] = False
                out[k] = 0
            elif block is None:
                self._paste(out[k], level, x, y, scale, tiles, touched[k])
            else:
                self._paste(block, level, x, y, 1, tiles, touched[k])
                out[k] = _area(block, out_px, out_px)
        return out, ok

    def resample_filter(self, level: int, read_px: int, out_px: int, coords: np.ndarray | None = None) -> str:
        if read_px == out_px:
            return "none"
        scale = self.decode_scale(level, read_px, out_px, coords)
        return f"jpeg-dct-1/{scale}" if scale > 1 else "area"

    def _warm(
        self, level: int, indices: Sequence[int], scale: int
    ) -> tuple[dict[int, np.ndarray], dict[int, SlideError]]:
        """Decode ``indices`` (threads in parallel; the cache first): the decoded tiles, and those that failed.

        The batch holds its own references, so a cache smaller than one batch never decodes a tile twice."""
        tiles: dict[int, np.ndarray] = {}
        bad: dict[int, SlideError] = {}

        def one(i: int) -> None:
            try:
                tiles[i] = self._tile(level, i, scale)
            except SlideError as e:
                bad[i] = e

        if self.threads > 1 and len(indices) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tiff-direct")
            list(self._pool.map(one, indices))
        else:
            for i in indices:
                one(i)
        return tiles, bad

    def reopen(self) -> None:
        """Nothing to reset: a failed tile leaves the handle usable (its error is per tile)."""

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


def _decode_jpeg(data: bytes, tables: bytes, rgb: bool, scale: int) -> np.ndarray:
    """One JPEG tile (abbreviated TIFF stream + JPEGTables) → RGB uint8, DCT-scaled by ``scale``."""
    import cv2

    body = data[2:] if data[:2] == b"\xff\xd8" else data
    head = tables[2:-2] if tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9" else b""
    stream = b"\xff\xd8" + (_ADOBE_RGB if rgb else b"") + head + body
    _check_jpeg_structure(stream)
    flag = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11: libjpeg writes RGB, no conversion pass
    if rgb_flag is not None:
        image = cv2.imdecode(np.frombuffer(stream, np.uint8), (flag[scale] & ~cv2.IMREAD_COLOR) | rgb_flag)
    else:
        image = cv2.imdecode(np.frombuffer(stream, np.uint8), flag[scale])
        image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise SlideError("libjpeg could not decode the tile")
    return image


def _check_jpeg_structure(stream: bytes) -> None:
    """Walk the marker segments up to the scan and check the end marker.

    Why: libjpeg only *warns* on a bogus segment length or a truncated stream and returns an image anyway
    (grey or shifted data); OpenSlide turns those warnings into errors, and so must we, or a corrupt tile
    would silently become features. Entropy-coded data is not checked (the decoder's errors cover it).
    """
    n, at = len(stream), 2
    while True:
        if at + 4 > n or stream[at] != 0xFF:
            raise SlideError(f"corrupt JPEG: no marker at byte {at}")
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = (stream[at + 2] << 8) | stream[at + 3]
        if length < 2 or at + 2 + length > n:
            raise SlideError(f"corrupt JPEG: segment 0x{marker:02X} at byte {at} has bogus length {length}")
        at += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if stream[-2:] != b"\xff\xd9":
        raise SlideError("corrupt JPEG: truncated (no end-of-image marker)")


def _area(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area (box-average) resize, the anti-aliased shrink DCT scaling approximates."""
    import cv2

    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_AREA)
