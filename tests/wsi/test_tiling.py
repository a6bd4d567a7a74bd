import numpy as np
import pytest

from pathopeft.wsi.tiling import tile_grid
from pathopeft.wsi.tissue import TissueMask


def test_grid_in_bounds_and_level0_coords():
    g = tile_grid((1000, 700), (1.0, 4.0), level0_mpp=0.25, target_mpp=0.5, tile_px=100)
    size_l0 = 200  # 100 px at 0.5 µm/px on a 0.25 µm/px slide
    assert g.tile_size_l0 == pytest.approx(size_l0)
    assert len(g) == 5 * 3
    assert g.coords.dtype == np.int64
    assert g.coords.shape == (15, 2)
    assert (g.coords[:, 0] + size_l0 <= 1000).all()
    assert (g.coords[:, 1] + size_l0 <= 700).all()
    assert g.choice.level == 0
    assert g.read_px == 200


def test_overlap_reduces_stride():
    g = tile_grid((1000, 200), (1.0,), level0_mpp=0.5, target_mpp=0.5, tile_px=200, overlap_px=100)
    np.testing.assert_array_equal(g.coords[:, 0], [0, 100, 200, 300, 400, 500, 600, 700, 800])


def test_slide_smaller_than_tile_gives_no_tiles():
    g = tile_grid((16, 16), (1.0,), 0.5, 0.5, tile_px=224)
    assert g.coords.shape == (0, 2)


def test_min_tissue_fraction_filters():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :3] = True  # tissue in the left 30%
    tm = TissueMask(mask, downsample=100.0)  # 1000x1000 level 0
    g = tile_grid((1000, 1000), (1.0,), 0.5, 0.5, tile_px=200, tissue=tm, min_tissue_fraction=0.6)
    assert len(g) == 5  # only the left column (x=200 tiles are exactly half tissue)
    assert (g.coords[:, 0] == 0).all()
    assert (g.tissue_fraction >= 0.6).all()
    half = tile_grid((1000, 1000), (1.0,), 0.5, 0.5, tile_px=200, tissue=tm, min_tissue_fraction=0.5)
    assert len(half) == 10
    g_all = tile_grid((1000, 1000), (1.0,), 0.5, 0.5, tile_px=200, tissue=tm, min_tissue_fraction=0.0)
    assert len(g_all) == 25


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_px": 0}, "tile_px"),
        ({"overlap_px": 224}, "overlap_px"),
        ({"min_tissue_fraction": 2.0}, "min_tissue_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tile_grid((1000, 1000), (1.0,), 0.5, 0.5, **kwargs)
