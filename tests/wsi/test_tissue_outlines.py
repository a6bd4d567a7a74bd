"""--tissue-geojson: QuPath / TRIDENT outlines as the tissue mask (holes, ignored classes, missing files)."""

from __future__ import annotations

import json

import pytest

from pathopeft.cli import main
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, run_batch
from pathopeft.wsi.config import SlideEntry
from pathopeft.wsi.pyramid import write_pyramid
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tissue import create_detector, detect_tissue
from pathopeft.wsi.tissue_outlines import OutlineError
from tests._tiny import blob_image


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("outlines")
    return write_pyramid(blob_image(1024, 1280, ((500, 600, 380),)), root / "s.tiff", mpp=0.5, levels=3, tile=128)


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_features_with_a_hole_and_an_ignored_annotation(slide, tmp_path):
    features = [  # QuPath 0.2–0.5 exports a bare list of features
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 800, 640), _square(200, 160, 400, 320)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(960, 800, 1200, 1000)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Ignore*"}}},
    ]  # fmt: skip
    (tmp_path / "s.geojson").write_text(json.dumps(features))
    det = create_detector("geojson", folder=str(tmp_path), mpp=4.0)
    with open_slide(slide) as s:
        mask = detect_tissue(s, det, slide_id="s")
    assert mask.downsample == pytest.approx(8.0)  # 4 µm/px on a 0.5 µm/px slide
    px = mask.mask
    assert px[640 // 8 // 2, 800 // 8 // 2 - 40]  # inside the outer ring
    assert not px[240 // 8, 300 // 8]  # inside its hole
    assert not px[900 // 8, 1080 // 8]  # the Ignore* annotation is left out
    assert px[:80, :100].mean() == pytest.approx(1 - (200 * 160) / (800 * 640), abs=0.03)


def test_our_own_contours_give_back_the_detected_mask(slide, tmp_path):
    with open_slide(slide) as s:
        detected = detect_tissue(s)
        detected.to_geojson(tmp_path / "s.geojson")  # the same format TRIDENT's contours_geojson/ uses
        outlined = detect_tissue(s, create_detector("geojson", folder=str(tmp_path)), slide_id="s")
    assert outlined.mask.shape == detected.mask.shape
    inter = (outlined.mask & detected.mask).sum()
    union = (outlined.mask | detected.mask).sum()
    assert inter / union > 0.95


def test_a_slide_without_outlines_fails_alone_naming_the_file(slide, tmp_path):
    (tmp_path / "geo").mkdir()
    with open_slide(slide) as s:
        detect_tissue(s).to_geojson(tmp_path / "geo" / "a.geojson")
    cfg = BatchConfig(out_dir=str(tmp_path / "run"), tiling=TilingConfig(target_mpp=1.0, tile_px=64, tissue="geojson",
                      tissue_params={"folder": str(tmp_path / "geo")}), extract=ExtractConfig(backbone=None),
                      progress=False)  # fmt: skip
    records = {r["slide_id"]: r for r in run_batch([SlideEntry("a", slide), SlideEntry("b", slide)], cfg)}
    assert records["a"]["status"] == "done"
    assert records["a"]["n_tiles"] > 0
    assert records["b"]["status"] == "failed"
    assert "b.geojson: no tissue outline file for slide 'b'" in records["b"]["error"]
    with pytest.raises(OutlineError), open_slide(slide) as s:
        create_detector("geojson", folder=str(tmp_path)).mask_for(s, "absent")


def test_cli_outlines_exclude_a_threshold(slide, tmp_path, capsys):
    rc = main(["wsi", "tile", "--slides", str(slide), "--out", str(tmp_path / "r"), "--tissue-geojson", str(tmp_path),
               "--tissue-threshold", "20"])  # fmt: skip
    assert rc == 2
    assert "--tissue-geojson and --tissue-threshold exclude each other" in capsys.readouterr().err
