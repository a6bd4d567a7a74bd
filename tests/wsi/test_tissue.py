import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from pathopeft.registry import UnknownPluginError
from pathopeft.wsi.tissue import TISSUE_DETECTORS, OtsuTissueDetector, TissueDetector, TissueMask, create_detector
from tests._tiny import blob_image


def test_detects_blob_not_background():
    img = blob_image()
    mask = OtsuTissueDetector().detect(img, mpp=4.0)
    assert mask.shape == img.shape[:2]
    assert mask[200, 300]  # blob centre
    assert not mask[10, 10]  # background corner
    truth = np.zeros_like(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    truth[(yy - 200) ** 2 + (xx - 300) ** 2 <= 120**2] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_blank_slide_has_no_tissue():
    noise = np.random.default_rng(0).integers(240, 256, size=(300, 300, 3), dtype=np.uint8)
    assert OtsuTissueDetector().detect(noise, mpp=4.0).sum() == 0


def test_area_filters_are_physical():
    """The same physical scene at two resolutions keeps the same objects (filters are in µm²)."""

    # big disc (radius 400 µm) and a speck (radius 40 µm: area ~5,000 µm² < 20,000 µm² minimum)
    def scene(mpp):
        return blob_image(int(2000 / mpp), int(2000 / mpp), ((int(1000 / mpp), int(800 / mpp), int(400 / mpp)),
                                                             (int(1000 / mpp), int(1700 / mpp), int(40 / mpp))))  # fmt: skip

    det = OtsuTissueDetector()
    for mpp in (4.0, 8.0):
        mask = det.detect(scene(mpp), mpp)
        assert mask[int(1000 / mpp), int(800 / mpp)], mpp
        assert not mask[int(1000 / mpp), int(1700 / mpp)], f"speck kept at {mpp} µm/px"
        area_um2 = mask.sum() * mpp * mpp
        assert area_um2 == pytest.approx(np.pi * 400**2, rel=0.1)


def test_large_holes_kept_small_holes_filled():
    img = blob_image(500, 500, ((250, 250, 200),))
    yy, xx = np.mgrid[:500, :500]
    img[(yy - 250) ** 2 + (xx - 250) ** 2 <= 60**2] = 245  # big lumen: 3.14*240² µm² ≫ 10,000
    img[(yy - 120) ** 2 + (xx - 250) ** 2 <= 4**2] = 245  # tiny hole: ~800 µm²
    det = OtsuTissueDetector(median_um=0, closing_um=0)
    mask = det.detect(img, mpp=4.0)
    assert not mask[250, 250]
    assert mask[120, 250]


def test_fixed_threshold_and_validation():
    img = blob_image()
    assert OtsuTissueDetector(threshold=250).detect(img, 4.0).sum() == 0
    with pytest.raises(ValueError, match="threshold"):
        OtsuTissueDetector(threshold=300)
    with pytest.raises(ValueError, match="mpp"):
        OtsuTissueDetector(mpp=0)


def test_registry_and_protocol():
    assert isinstance(create_detector("otsu"), TissueDetector)
    assert "otsu" in TISSUE_DETECTORS
    assert TISSUE_DETECTORS.get("otsu") is OtsuTissueDetector
    with pytest.raises(UnknownPluginError, match=r"unknown tissue detector 'unet' \(known: otsu"):
        create_detector("unet")
    assert issubclass(UnknownPluginError, KeyError)  # callers that caught the KeyError still do


def test_a_registered_detector_is_created_by_name():
    @TISSUE_DETECTORS.register("everything")
    @dataclass
    class Everything:
        mpp: float = 8.0
        name: str = "everything"

        def params(self):
            return {"mpp": self.mpp}

        def detect(self, image, mpp):
            return np.ones(image.shape[:2], dtype=bool)

    try:
        det = create_detector("everything", mpp=2.0)
        assert isinstance(det, TissueDetector)
        assert det.detect(blob_image(), 2.0).all()
    finally:
        TISSUE_DETECTORS.remove("everything")
    assert "everything" not in TISSUE_DETECTORS


def test_tile_fractions_summed_area_table():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # left half tissue
    tm = TissueMask(mask, downsample=10.0)  # 100x100 level-0 px
    coords = np.array([[0, 0], [50, 0], [25, 0], [90, 90]])
    frac = tm.tile_fractions(coords, tile_size_l0=50)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5, 0.0], atol=1e-6)  # 25..75 over tissue 0..50
    assert tm.fraction == pytest.approx(0.5)


def test_geojson_polygon_with_hole(tmp_path):
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:35, 5:30] = True
    mask[15:25, 12:20] = False  # hole
    mask[10:20, 38:45] = True  # second piece
    tm = TissueMask(mask, downsample=4.0)
    gj = tm.to_geojson(tmp_path / "t.geojson")
    on_disk = json.loads((tmp_path / "t.geojson").read_text())
    assert on_disk == gj
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == 2
    rings = sorted((f["geometry"]["coordinates"] for f in feats), key=len, reverse=True)
    assert len(rings[0]) == 2
    assert len(rings[1]) == 1
    for poly in rings:
        for ring in poly:
            assert ring[0] == ring[-1]  # closed, as GeoJSON requires
    xs = [p[0] for p in rings[0][0]]
    ys = [p[1] for p in rings[0][0]]
    # level-0 pixels: columns 5..30 x 4 and rows 5..35 x 4
    assert min(xs) == pytest.approx(20, abs=4)
    assert max(xs) == pytest.approx(120, abs=4)
    assert min(ys) == pytest.approx(20, abs=4)
    assert max(ys) == pytest.approx(140, abs=4)
    assert feats[0]["properties"]["objectType"] == "annotation"


def test_polygons_rasterise_back_to_mask():
    """Drawing the exported polygons reproduces the mask (contours are not shifted or inverted)."""
    from PIL import ImageDraw

    img = blob_image(200, 300, ((100, 100, 60), (100, 230, 40)))
    mask = OtsuTissueDetector(median_um=0, closing_um=0).detect(img, 4.0)
    tm = TissueMask(mask, downsample=1.0)
    canvas = Image.new("L", (300, 200), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in tm.polygons(tolerance_px=0.5):
        draw.polygon([tuple(p) for p in poly[0]], fill=1)
        for hole in poly[1:]:
            draw.polygon([tuple(p) for p in hole], fill=0)
    raster = np.asarray(canvas).astype(bool)
    iou = (raster & mask).sum() / (raster | mask).sum()
    assert iou > 0.97


def _skimage_recipe(image: np.ndarray, mpp: float, d: OtsuTissueDetector) -> np.ndarray:
    """The same recipe as the detector before it moved to OpenCV (float HSV, disk median, skimage morphology):
    the reference its masks are held to."""
    from skimage import color, filters, morphology

    sat = (color.rgb2hsv(image[..., :3])[..., 1] * 255).astype(np.uint8)
    r = max(0, round(d.median_um / mpp / 2))
    sat = filters.median(sat, morphology.disk(r)) if r else sat
    thr = max(filters.threshold_otsu(sat), d.min_saturation) if sat.min() != sat.max() else 255
    mask = sat > thr
    r = max(0, round(d.closing_um / mpp / 2))
    mask = morphology.closing(mask, morphology.disk(r)) if r else mask
    px = mpp * mpp
    mask = morphology.remove_small_objects(mask, max_size=max(0, int(d.min_tissue_area_um2 / px) - 1))
    return morphology.remove_small_holes(mask, max_size=max(0, int(d.max_hole_area_um2 / px) - 1))


@pytest.mark.shared
@pytest.mark.parametrize(("name", "mpp"), [("CMU-1-Small-Region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)])
def test_opencv_masks_agree_with_the_skimage_recipe(slides_dir, name, mpp):
    """Stated tolerance: IoU ≥ 0.97 against the scikit-image recipe at the same 4 µm/px, ≥ 0.93 at the new
    default 8 µm/px (measured 0.977/0.993 and 0.954/0.984 on these two slides)."""
    import cv2

    from pathopeft.wsi.slide import open_slide, read_at_mpp

    slide = open_slide(slides_dir / name, mpp=mpp)
    img4, ds4 = read_at_mpp(slide, 4.0)
    reference = _skimage_recipe(img4, slide.mpp * ds4, OtsuTissueDetector(mpp=4.0))
    assert reference.mean() > 0.2
    for work_mpp, floor in ((4.0, 0.97), (8.0, 0.93)):
        img, ds = read_at_mpp(slide, work_mpp)
        mask = OtsuTissueDetector(mpp=work_mpp).detect(img, slide.mpp * ds)
        up = cv2.resize(mask.astype(np.uint8), reference.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
        assert (up & reference).sum() / (up | reference).sum() >= floor
