"""Our coords files read by CLAM's and TRIDENT's reading logic fetch exactly the pixels pathopeft read.

The two readers are restated here from their code (CLAM @ 53e2409 ``dataset_modules/dataset_h5.py::
Whole_Slide_Bag_FP``; TRIDENT @ a91fa84 ``wsi_objects/WSI.py::extract_patch_features`` →
``WSIPatcher.__init__``/``_prepare``/``get_tile_xy`` and ``WSI.get_best_level_and_custom_downsample``), as
arithmetic on the attributes plus an OpenSlide ``read_region``. The case that matters is a target that is not a
pyramid level (40x Aperio at 0.5 µm/px in real life), where the two tools disagree on what ``patch_size`` means.
"""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, h5io, run_batch
from pathopeft.wsi.config import SlideEntry
from pathopeft.wsi.pyramid import write_pyramid
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tiling import tile_grid
from tests._tiny import blob_image


def clam_read(wsi: openslide.OpenSlide, attrs: dict, coord: np.ndarray) -> np.ndarray:
    """CLAM: ``patch_size`` pixels at ``patch_level`` (the transform resizes them afterwards)."""
    size = int(attrs["patch_size"])
    region = wsi.read_region(tuple(int(v) for v in coord), int(attrs["patch_level"]), (size, size))
    return np.asarray(region.convert("RGB"))


def trident_read(wsi: openslide.OpenSlide, attrs: dict, coord: np.ndarray) -> np.ndarray:
    """TRIDENT's non-legacy path (taken because patch_size and both magnifications are present), before its resize."""
    patch_size = int(attrs["patch_size"])
    downsample = (10 / attrs["target_magnification"]) / (10 / attrs["level0_magnification"])
    size_src = round(patch_size * downsample)
    downsamples = wsi.level_downsamples
    level = next((i for i, d in enumerate(downsamples) if abs(d - downsample) <= 0.1), None)
    if level is None:  # highest level whose downsample does not exceed the wanted one
        level = max(i for i, d in enumerate(downsamples) if d <= downsample)
    size_level = round(size_src / int(downsamples[level]))
    region = wsi.read_region(tuple(int(v) for v in coord), level, (size_level, size_level))
    return np.asarray(region.convert("RGB"))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    img = blob_image(1536, 1536, ((760, 760, 600),))
    return write_pyramid(img, tmp_path_factory.mktemp("interop") / "p.tiff", mpp=0.25, levels=3, tile=128)


@pytest.mark.parametrize(
    ("target_mpp", "level", "resized"),
    [(0.5, 1, False), (0.75, 1, True), (0.35, 0, True), (1.6, 2, True)],
)
def test_clam_and_trident_fetch_our_pixels(pyramid, tmp_path, target_mpp, level, resized):
    out = tmp_path / "run"
    cfg = BatchConfig(
        out_dir=str(out),
        tiling=TilingConfig(target_mpp=target_mpp, tile_px=64, min_tissue_fraction=0.5),
        extract=ExtractConfig(backbone=None),
        qc=False,
        progress=False,
    )
    (rec,) = run_batch([SlideEntry("p", pyramid)], cfg)
    assert rec["status"] == "done", rec
    coords, attrs = h5io.read_coords(out / "patches" / "p.h5")
    assert len(coords) >= 4
    assert attrs["patch_level"] == level
    assert (attrs["patch_size"] != attrs["target_patch_size"]) == resized
    wsi = openslide.OpenSlide(str(pyramid))
    with openslide.OpenSlide(str(pyramid)) as s:
        grid = tile_grid(s.dimensions, s.level_downsamples, 0.25, target_mpp, tile_px=64)
    ours = open_slide(pyramid)
    ds = int(wsi.level_downsamples[level])
    for k in np.linspace(0, len(coords) - 1, 4).astype(int):
        x, y = (int(v) for v in coords[k])
        mine = ours.read_region((x, y), level, (grid.read_px, grid.read_px))  # pathopeft's read before resizing
        for theirs in (clam_read(wsi, attrs, coords[k]), trident_read(wsi, attrs, coords[k])):
            if not (coords[k] % ds).any():  # on the level's pixel lattice: the same pixels
                np.testing.assert_array_equal(theirs, mine)
            else:  # OpenSlide interpolates a sub-pixel offset; the tile-direct reader takes the nearest pixel
                assert np.abs(theirs.astype(int) - mine).mean() < 1.0
    # TRIDENT's slide encoders take the level-0 footprint from patch_size_level0
    assert attrs["patch_size_level0"] == round(64 * target_mpp / 0.25)
    assert attrs["tile_magnification"] == pytest.approx(10 / target_mpp)
