"""The tile-direct TIFF/SVS reader: the same pixels as a reference decode, each slide tile decoded once,
DCT-scaled shrinks close to an area filter, bad tiles isolated, and OpenSlide as the fallback."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pathopeft.wsi.pyramid import write_pyramid
from pathopeft.wsi.slide import OpenSlideSlide, SlideError, open_slide
from pathopeft.wsi.tiff_direct import DirectTiffSlide
from tests._tiny import blob_image


def _reference(path: Path, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """tifffile's own decode of the whole level, sliced, white outside: an oracle independent of our tiles."""
    with tifffile.TiffFile(path) as t:
        full = t.series[0].levels[level].pages[0].asarray()[..., :3]
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, full.shape[1]), min(y + h, full.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1]
    return out


def _windows(slide: DirectTiffSlide, level: int, n: int = 12, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    w, h = slide.level_dimensions[level]
    return [(int(rng.integers(-40, w)), int(rng.integers(-40, h)), int(rng.integers(1, 300)), int(rng.integers(1, 300))) for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def jpeg_pyramid(tmp_path_factory) -> Path:
    """A 3-level YCbCr JPEG pyramid (128-px tiles) with odd sizes, so edge tiles are partial."""
    img = blob_image(1000, 1234, ((500, 600, 380), (200, 900, 120)))
    return write_pyramid(
        img, tmp_path_factory.mktemp("direct") / "j.tiff", mpp=0.25, levels=3, tile=128, compression="jpeg"
    )


@pytest.mark.shared
@pytest.mark.parametrize(
    "name", ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "openslide-python-boxes.tiff"]
)  # Aperio RGB-JPEG, Aperio JPEG 2000, deflate
def test_real_slides_read_the_reference_pixels_at_every_level(slides_dir, name):
    path = slides_dir / name
    with open_slide(path) as slide:
        assert slide.backend == "tiff-direct"
        osr = OpenSlideSlide(path)
        assert slide.level_dimensions == osr.level_dimensions
        assert slide.level_downsamples == pytest.approx(osr.level_downsamples)
        assert slide.mpp == osr.mpp
        for level in range(slide.level_count):
            ds = slide.level_downsamples[level]
            for x, y, w, h in _windows(slide, level):
                got = slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
                np.testing.assert_array_equal(got, _reference(path, level, x, y, w, h))
        for x, y, w, h in _windows(slide, 0, seed=1):  # level 0: OpenSlide's pixels, border padding included
            np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), osr.read_region((x, y), 0, (w, h)))


def test_generated_ycbcr_jpeg_pyramid_matches_tifffile_and_openslide(jpeg_pyramid):
    slide = DirectTiffSlide(jpeg_pyramid)
    osr = OpenSlideSlide(jpeg_pyramid)
    for level in range(3):
        for x, y, w, h in _windows(slide, level, seed=level):
            ds = round(slide.level_downsamples[level])
            got = slide.read_region((x * ds, y * ds), level, (w, h))
            np.testing.assert_array_equal(got, _reference(jpeg_pyramid, level, x, y, w, h))
            lw, lh = slide.level_dimensions[level]
            x0, y0 = max(x, 0), max(y, 0)
            w, h = min(x + w, lw) - x0, min(y + h, lh) - y0
            exact = slide.level_downsamples[level] == ds  # else OpenSlide interpolates a sub-pixel offset
            if exact and w > 0 and h > 0:  # inside the level (past its edge OpenSlide shows the tile padding)
                got = slide.read_region((x0 * ds, y0 * ds), level, (w, h))
                np.testing.assert_array_equal(got, osr.read_region((x0 * ds, y0 * ds), level, (w, h)))


def test_each_slide_tile_is_decoded_once(jpeg_pyramid, monkeypatch):
    slide = DirectTiffSlide(jpeg_pyramid)
    decoded: list[tuple[int, int, int]] = []
    real = slide._decode
    monkeypatch.setattr(slide, "_decode", lambda lv, i, s: decoded.append((lv, i, s)) or real(lv, i, s))
    coords = np.array([(x, y) for y in range(0, 600, 100) for x in range(0, 900, 100)])  # 200-px windows overlap
    slide.read_tiles(coords, 0, 200, 200)
    assert len(decoded) == len(set(decoded))
    touched = {i for x, y in coords for i in slide._tiles_for(0, int(x), int(y), 200, 200)}
    assert {i for _, i, _ in decoded} == touched


def test_dct_scaled_shrink_is_close_to_an_area_filter(jpeg_pyramid):
    slide = DirectTiffSlide(jpeg_pyramid)
    coords = np.array([(256, 256), (512, 384), (0, 0)])
    assert slide.resample_filter(0, 256, 128) == "jpeg-dct-1/2"
    assert slide.resample_filter(0, 384, 128) == "area"  # a factor of 3: full decode, one area resize
    fast, ok = slide.read_tiles(coords, 0, 256, 128)
    assert ok.all()
    for k, (x, y) in enumerate(coords):
        area = cv2.resize(slide.read_region((int(x), int(y)), 0, (256, 256)), (128, 128), interpolation=cv2.INTER_AREA)
        diff = np.abs(fast[k].astype(int) - area)
        assert diff.mean() < 1.0
        assert np.percentile(diff, 99) <= 8
    area3, _ = slide.read_tiles(coords, 0, 384, 128)
    full = slide.read_region((256, 256), 0, (384, 384))
    np.testing.assert_array_equal(area3[0], cv2.resize(full, (128, 128), interpolation=cv2.INTER_AREA))


def test_threads_give_the_same_pixels(jpeg_pyramid):
    coords = np.array([(x, y) for y in range(0, 700, 150) for x in range(0, 1000, 150)])
    one, _ = DirectTiffSlide(jpeg_pyramid, threads=1).read_tiles(coords, 0, 256, 128)
    four, _ = DirectTiffSlide(jpeg_pyramid, threads=4).read_tiles(coords, 0, 256, 128)
    np.testing.assert_array_equal(one, four)


def test_open_slide_and_tile_batches_pass_the_decode_threads(jpeg_pyramid):
    from pathopeft.wsi.extract import TileBatches
    from pathopeft.wsi.tiling import tile_grid

    with open_slide(jpeg_pyramid, threads=3) as s:
        assert (s.backend, s.threads) == ("tiff-direct", 3)
        grid = tile_grid(s.dimensions, s.level_downsamples, 0.25, 0.5, tile_px=64)
    assert OpenSlideSlide(jpeg_pyramid).threads == 1  # the base default; OpenSlide decodes in one library call
    assert TileBatches(jpeg_pyramid, grid, read_threads=2).handle().threads == 2


@pytest.fixture(scope="module")
def one_bad_tile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "bad.tiff"
    tifffile.imwrite(path, blob_image(512, 512), tile=(128, 128), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as t:
        offset = t.pages[0].dataoffsets[5]  # tile row 1, column 1: x, y 128–256
    with open(path, "r+b") as f:
        f.seek(offset + 4)
        f.write(b"\x00\x01")  # a bogus segment length (libjpeg would only warn and return an image)
    return path


def test_a_corrupt_tile_fails_alone_and_names_the_file(one_bad_tile):
    slide = open_slide(one_bad_tile)
    assert slide.backend == "tiff-direct"
    with pytest.raises(SlideError, match=r"bad\.tiff: tile 5 of level 0 undecodable \(corrupt JPEG"):
        slide.read_region((100, 100), 0, (64, 64))
    tiles, ok = slide.read_tiles(np.array([(0, 0), (100, 100), (300, 300)]), 0, 64, 64)
    assert ok.tolist() == [True, False, True]
    assert not tiles[1].any()


def test_what_it_cannot_read_falls_back_to_openslide(tmp_path):
    stripped = tmp_path / "stripped.tiff"  # pyramid levels without tiles
    with tifffile.TiffWriter(stripped) as tw:
        img = blob_image(256, 256)
        tw.write(img, photometric="rgb", subifds=1)
        tw.write(img[::2, ::2], photometric="rgb", subfiletype=1)
    with pytest.raises(SlideError, match="not tiled"):
        DirectTiffSlide(stripped)
    with open_slide(stripped) as s:
        assert s.backend != "tiff-direct"


def test_openslide_read_tiles_is_the_old_region_by_region_path(jpeg_pyramid):
    from PIL import Image

    osr = OpenSlideSlide(jpeg_pyramid)
    coords = np.array([(256, 256), (0, 512)])
    tiles, ok = osr.read_tiles(coords, 0, 256, 128)
    assert ok.all()
    assert osr.resample_filter(0, 256, 128) == "pil-bilinear-reducing-gap-2"
    for k, (x, y) in enumerate(coords):
        region = osr.read_region((int(x), int(y)), 0, (256, 256))
        expected = np.asarray(Image.fromarray(region).resize((128, 128), Image.BILINEAR, reducing_gap=2.0))
        np.testing.assert_array_equal(tiles[k], expected)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_reduced_region_decodes_small_and_stays_close_to_an_area_filter(jpeg_pyramid, scale, monkeypatch):
    """What tissue detection reads: 1/scale of the pixels decoded (the DCT-scaled tiles), an area-like result."""
    slide = DirectTiffSlide(jpeg_pyramid)
    scales: list[int] = []
    real = slide._decode
    monkeypatch.setattr(slide, "_decode", lambda lv, i, s: scales.append(s) or real(lv, i, s))
    small = slide.read_region_reduced((0, 0), 0, (1234, 1000), scale)
    assert set(scales) == {scale}
    full = slide.read_region((0, 0), 0, (1234, 1000))
    area = cv2.resize(full, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert small.shape[:2] == (-(-1000 // scale), -(-1234 // scale))
    assert np.abs(small.astype(int) - area).mean() < 2.0


def test_the_recorded_filter_is_the_one_read_tiles_uses(jpeg_pyramid):
    """Tiles off the DCT lattice (an odd level-0 x) are area-resized, and the recorded filter says so."""
    slide = DirectTiffSlide(jpeg_pyramid)
    on, off = np.array([(256, 256)]), np.array([(257, 256)])
    assert slide.resample_filter(0, 256, 128, on) == "jpeg-dct-1/2"
    assert slide.resample_filter(0, 256, 128, off) == "area"
    tiles, _ = slide.read_tiles(off, 0, 256, 128)
    area = cv2.resize(slide.read_region((257, 256), 0, (256, 256)), (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(tiles[0], area)
