"""The WSI stage on the real slides in ../shared/test_slides (skipped when absent)."""

from __future__ import annotations

import csv
import json

import cv2
import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, read_manifest, run_batch
from pathopeft.wsi.extract import TileBatches
from pathopeft.wsi.slide import SlideError, open_slide
from pathopeft.wsi.tiling import tile_grid
from tests._tiny import TINY_VIT

pytestmark = pytest.mark.shared


def _cfg(out, tile_px=256, backbone=True, **tiling):
    kw = dict(TINY_VIT)
    name = kw.pop("name")
    return BatchConfig(
        out_dir=str(out),
        tiling=TilingConfig(target_mpp=tiling.pop("target_mpp", 0.5), tile_px=tile_px, **tiling),
        extract=ExtractConfig(backbone=name if backbone else None, backbone_kwargs=kw, num_workers=0, batch_size=16),
        progress=False,
    )


def _manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "mpp"])
        w.writerows(rows)
    return read_manifest(path)


@pytest.fixture(scope="module")
def cmu_run(cmu_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu")
    entries = _manifest(out / "m.csv", [["cmu", str(cmu_slide), ""]])
    records = run_batch(entries, _cfg(out / "run"))
    return out / "run", records[0]


def test_happy_path_cmu(cmu_run, cmu_slide):
    run, rec = cmu_run
    assert rec["status"] == "done", rec
    assert rec["mpp_source"] == "openslide.mpp-x"
    assert rec["level0_mpp"] == pytest.approx(0.499)
    assert 0.2 < rec["tissue_fraction"] < 0.5  # ~34% tissue on this skin section
    with h5py.File(run / "features_vit_tiny_patch16_224" / "cmu.h5") as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert f.attrs["encoder"] == "vit_tiny_patch16_224"
        assert f.attrs["encoder_weights"] == "random-init"
    assert len(coords) == rec["n_tiles"] >= 10
    assert feats.shape == (len(coords), 32)
    assert np.isfinite(feats).all()
    assert feats.std(0).mean() > 0  # not a constant output
    # coords in bounds: a 256-px tile at 0.5 µm/px is ~256.5 level-0 px on a 0.499 µm/px slide
    size_l0 = 256 * 0.5 / 0.499
    assert (coords >= 0).all()
    assert (coords[:, 0] + size_l0 <= 2220 + 1).all()
    assert (coords[:, 1] + size_l0 <= 2967 + 1).all()
    # tiles lie on tissue: the kept tiles are darker/more saturated than the slide background
    with open_slide(cmu_slide) as s:
        tiles = [s.read_region(tuple(c), 0, (64, 64)) for c in coords[:: max(1, len(coords) // 8)]]
        corner = s.read_region((0, 0), 0, (64, 64))
    assert np.mean([t.mean() for t in tiles]) < corner.mean() - 20
    gj = json.loads((run / "tissue" / "cmu.geojson").read_text())
    assert gj["features"]
    assert gj["features"][0]["geometry"]["type"] == "Polygon"
    assert Image.open(run / "qc" / "cmu.png").size[0] > 100
    assert "| 1 | 1 | 0 | 0 | 0 |" in (run / "summary.md").read_text()


def test_h5_reads_like_clam_and_trident(cmu_run, cmu_slide):
    """Read the patches file the way CLAM's Whole_Slide_Bag_FP and TRIDENT's loaders do."""
    run, _ = cmu_run
    path = run / "patches" / "cmu.h5"
    with h5py.File(path, "r") as f:  # CLAM
        dset = f["coords"]
        patch_level = int(dset.attrs["patch_level"])
        patch_size = int(dset.attrs["patch_size"])
        custom_downsample = float(dset.attrs["custom_downsample"])
        coord = dset[3]
        n = len(dset)
    wsi = openslide.OpenSlide(str(cmu_slide))
    img = wsi.read_region(tuple(int(v) for v in coord), patch_level, (patch_size, patch_size)).convert("RGB")
    target = round(patch_size / custom_downsample)
    assert target == 256
    assert img.size == (patch_size, patch_size)
    assert n > 3
    with h5py.File(path, "r") as f:  # TRIDENT
        attrs = f["coords"].attrs
        assert attrs["patch_size_level0"] == round(256 * 0.5 / 0.499)
        assert attrs["target_magnification"] == pytest.approx(10 / 0.499)  # of the pixels read (no level at 20x)
        assert attrs["tile_magnification"] == pytest.approx(20.0)
        assert attrs["level0_magnification"] == pytest.approx(10 / 0.499)
        assert {"overlap", "name", "level0_width", "level0_height", "target_mpp", "level0_mpp"} <= set(attrs)
        assert "tissue_method" in f.attrs
        assert "params_hash" in f.attrs


def test_tcga_without_mpp_is_skipped_then_processed_with_manifest_mpp(slides_dir, tmp_path):
    slide = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    rec = run_batch(_manifest(tmp_path / "a.csv", [["tcga", str(slide), ""]]), _cfg(tmp_path / "a", backbone=False))[0]
    assert rec["status"] == "skipped"
    assert rec["reason"] == "no mpp"
    assert not (tmp_path / "a" / "patches" / "tcga.h5").exists()
    rec = run_batch(_manifest(tmp_path / "b.csv", [["tcga", str(slide), "0.25"]]), _cfg(tmp_path / "b", tile_px=128))[
        0
    ]
    assert rec["status"] == "done", rec
    assert rec["mpp_source"] == "manifest"
    assert rec["level"] == 1
    assert rec["n_tiles"] > 0
    assert rec["n_features"] == rec["n_tiles"]


@pytest.mark.parametrize(("target_mpp", "level"), [(0.5, 0), (1.0, 1), (2.0, 2), (1.5, 1), (4.0, 3)])
def test_pyramid_level_choice_and_pixels(cmu_pyramid, cmu_slide, target_mpp, level):
    with open_slide(cmu_pyramid) as s:
        assert s.level_count == 4
        assert s.mpp == pytest.approx(0.499, rel=1e-3)
        grid = tile_grid(s.dimensions, s.level_downsamples, s.mpp, target_mpp, tile_px=64)
        assert grid.choice.level == level
        k = len(grid) // 2
        tile = TileBatches(cmu_pyramid, grid, batch_size=1)[k][0][0].permute(1, 2, 0).numpy()
        x, y = (int(v) for v in grid.coords[k])
        direct = s.read_region((x, y), level, (grid.read_px, grid.read_px))
    if grid.read_px == 64:
        np.testing.assert_array_equal(tile, direct)  # exact level: the tile is the direct read
    else:
        # the pipeline shrinks with an area filter (or libjpeg's DCT scaling, which is close to one)
        resized = cv2.resize(direct, (64, 64), interpolation=cv2.INTER_AREA)
        assert np.abs(tile.astype(int) - resized.astype(int)).mean() < 3
    # and it shows the same place as level 0 of the original slide, downsampled (compared at 16x16 so that the
    # sub-pixel phase of coarse levels does not count; a misplaced tile differs by far more)
    with open_slide(cmu_slide) as s0:
        size_l0 = round(64 * grid.choice.target_downsample)
        ref = s0.read_region((x, y), 0, (size_l0, size_l0))
        shifted = s0.read_region((x + size_l0 // 4, y), 0, (size_l0, size_l0))

    def small(a):
        return np.asarray(Image.fromarray(a).resize((16, 16), Image.BOX)).astype(int)

    err = np.abs(small(tile) - small(ref)).mean()
    assert err < 8
    assert err < np.abs(small(tile) - small(shifted)).mean() / 2


def test_broken_and_odd_slides_end_with_the_right_status(slides_dir, cmu_slide, tmp_path):
    rows = [
        ["unreadable", str(slides_dir / "openslide-python-unreadable.svs"), ""],
        ["broken", str(slides_dir / "histolab-broken.svs"), ""],
        ["kidney", str(slides_dir / "kidney-48-5.tif"), ""],
        ["kidney_mpp", str(slides_dir / "kidney-48-5.tif"), "0.5"],
        ["small", str(slides_dir / "openslide-python-small.svs"), ""],
        ["missing", str(slides_dir / "does-not-exist.svs"), ""],
        ["cmu", str(cmu_slide), ""],
    ]
    out = tmp_path / "run"
    records = {r["slide_id"]: r for r in run_batch(_manifest(tmp_path / "m.csv", rows), _cfg(out, tile_px=128))}
    assert records["unreadable"]["status"] == "failed"
    assert "openslide-python-unreadable.svs" in records["unreadable"]["error"]
    assert (
        "corrupt JPEG" in records["unreadable"]["error"]
    )  # the tile-direct reader's check (OpenSlide: "Bogus marker")
    assert records["broken"]["status"] == "failed"
    assert "histolab-broken.svs" in records["broken"]["error"]
    assert records["missing"]["status"] == "failed"
    assert "no such file" in records["missing"]["error"]
    assert records["kidney"]["status"] == "skipped"
    assert records["kidney"]["reason"] == "no mpp"
    k = records["kidney_mpp"]
    assert k["status"] == "done"
    assert k["backend"] == "tifffile"
    assert k["tissue_fraction"] < 0.05
    small = records["small"]
    assert small["status"] == "done"
    assert small["n_tiles"] == 0
    with h5py.File(out / "features_vit_tiny_patch16_224" / "small.h5") as f:
        assert f["coords"].shape == (0, 2)
        assert f["features"].shape == (0, 32)
    assert records["cmu"]["status"] == "done"
    assert records["cmu"]["n_tiles"] > 0
    failures = list(csv.DictReader((out / "failures.csv").open()))
    assert {r["slide_id"] for r in failures} == {"unreadable", "broken", "missing", "kidney"}
    summary = (out / "summary.md").read_text()
    assert "| 7 | 3 | 1 | 3 | 0 |" in summary


def test_open_slide_errors_name_the_file(slides_dir):
    with pytest.raises(SlideError, match=r"histolab-broken\.svs"):
        open_slide(slides_dir / "histolab-broken.svs")
    with (
        open_slide(slides_dir / "openslide-python-unreadable.svs") as s,
        pytest.raises(SlideError, match=r"unreadable\.svs"),
    ):
        s.read_region((0, 0), 0, (16, 16))
