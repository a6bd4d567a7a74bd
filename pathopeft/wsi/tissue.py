"""Tissue detection without weights, and tissue contours that QuPath opens.

A detector is anything with ``name``, ``params()`` and ``detect(image, mpp) -> bool mask``; the default
:class:`OtsuTissueDetector` is the classic HSV-saturation recipe. All size parameters are physical (µm,
µm²) and converted to pixels at the working resolution, so the same config means the same thing on a 0.25
and a 0.5 µm/px scan. A learned segmenter plugs in by implementing the same three members and registering
its class with ``@TISSUE_DETECTORS.register("name")`` (then ``--tissue name`` picks it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np

from pathopeft.registry import Registry

if TYPE_CHECKING:
    from pathopeft.wsi.slide import Slide


@runtime_checkable
class TissueDetector(Protocol):
    """The plug-in interface: an RGB image at a known resolution in, a boolean tissue mask out."""

    name: str
    mpp: float  # resolution (µm/px) the detector wants its input at

    def params(self) -> dict[str, Any]:
        """Every parameter that changes the result (stored in output files and in the resume hash)."""
        ...

    def detect(self, image: np.ndarray, mpp: float) -> np.ndarray:
        """Boolean (H, W) tissue mask for an RGB uint8 (H, W, 3) image at ``mpp`` µm/px."""
        ...


#: Tissue detector classes by name (``--tissue otsu``), in registration order.
TISSUE_DETECTORS: Registry[type] = Registry("tissue detector")


def _disk_radius_px(size_um: float, mpp: float) -> int:
    return max(0, round(size_um / mpp / 2))


@TISSUE_DETECTORS.register("otsu")
@dataclass
class OtsuTissueDetector:
    """HSV saturation → median blur → Otsu (or fixed) threshold → closing → area filters in µm².

    OpenCV throughout (uint8 saturation, median blur, elliptical closing, connected components for the µm²
    filters): tens of milliseconds at 8 µm/px on a 30k² slide, where the same recipe in scikit-image (float64
    HSV, disk median) took seconds.

    Args:
        mpp: working resolution in µm/px (8 µm/px ≈ a 1/16 thumbnail of a 0.5 µm/px scan).
        threshold: fixed saturation threshold in 0..255, or ``None`` for Otsu.
        min_saturation: floor under the Otsu threshold, so an empty (all-background) slide does not get
            half of its noise labelled tissue.
        median_um: median-blur window, µm.
        closing_um: morphological closing disk diameter, µm (bridges gaps between tissue fragments).
        min_tissue_area_um2: connected tissue pieces smaller than this are dropped (dust, debris).
        max_hole_area_um2: holes smaller than this are filled; larger holes stay holes (lumens, tears).
    """

    mpp: float = 8.0
    threshold: int | None = None
    min_saturation: int = 15
    median_um: float = 30.0
    closing_um: float = 30.0
    min_tissue_area_um2: float = 20_000.0
    max_hole_area_um2: float = 10_000.0
    name: str = field(default="otsu", init=False)

    def __post_init__(self) -> None:
        if self.mpp <= 0:
            raise ValueError(f"OtsuTissueDetector.mpp must be > 0, got {self.mpp}")
        if self.threshold is not None and not 0 <= self.threshold <= 255:
            raise ValueError(f"OtsuTissueDetector.threshold must be in 0..255 or None, got {self.threshold}")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def detect(self, image: np.ndarray, mpp: float) -> np.ndarray:
        if image.size == 0:
            return np.zeros(image.shape[:2], dtype=bool)
        sat = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2HSV)[..., 1]  # (max−min)/max·255
        r = _disk_radius_px(self.median_um, mpp)
        if r > 0:
            sat = cv2.medianBlur(np.ascontiguousarray(sat), 2 * r + 1)
        if self.threshold is not None:
            thr = self.threshold
        elif sat.min() == sat.max():
            thr = 255
        else:
            thr = max(int(cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0]), self.min_saturation)
        mask = (sat > thr).astype(np.uint8)
        r = _disk_radius_px(self.closing_um, mpp)
        if r > 0:
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            pad = cv2.copyMakeBorder(mask, r, r, r, r, cv2.BORDER_CONSTANT, value=0)  # no tissue beyond the slide
            mask = cv2.morphologyEx(pad, cv2.MORPH_CLOSE, disk)[r:-r, r:-r]
        px_area = mpp * mpp
        mask = _drop_small_components(mask, int(self.min_tissue_area_um2 / px_area))
        holes = _drop_small_components(1 - mask, int(self.max_hole_area_um2 / px_area))
        return holes == 0


def _drop_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` (uint8 0/1) without its 4-connected components of fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # label 0 is the background of this mask
    return keep[labels].astype(np.uint8)


def create_detector(name: str = "otsu", **params: Any) -> TissueDetector:
    """Build a tissue detector by registered name; an unknown name is an ``UnknownPluginError`` listing them."""
    return TISSUE_DETECTORS.get(name)(**params)


@dataclass
class TissueMask:
    """A boolean tissue mask plus how it maps to level 0 (``downsample`` level-0 px per mask px)."""

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tile_fractions(self, coords_l0: np.ndarray, tile_size_l0: float) -> np.ndarray:
        """Tissue fraction inside each level-0 square tile, from a summed-area table (vectorised)."""
        if len(coords_l0) == 0:
            return np.zeros(0, dtype=np.float32)
        h, w = self.mask.shape
        sat = np.zeros((h + 1, w + 1), dtype=np.int64)
        sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        x0 = np.clip(np.floor(coords_l0[:, 0] / self.downsample).astype(int), 0, w)
        y0 = np.clip(np.floor(coords_l0[:, 1] / self.downsample).astype(int), 0, h)
        x1 = np.clip(np.ceil((coords_l0[:, 0] + tile_size_l0) / self.downsample).astype(int), 0, w)
        y1 = np.clip(np.ceil((coords_l0[:, 1] + tile_size_l0) / self.downsample).astype(int), 0, h)
        x1 = np.maximum(x1, np.minimum(x0 + 1, w))
        y1 = np.maximum(y1, np.minimum(y0 + 1, h))
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        return (inside / area).astype(np.float32)

    def polygons(self, tolerance_px: float = 1.0) -> list[list[np.ndarray]]:
        """Tissue outlines as polygons ``[outer, hole, hole, …]`` of level-0 (x, y) vertices, rings closed."""
        from matplotlib.path import Path as MplPath
        from skimage import measure

        padded = np.pad(self.mask.astype(np.uint8), 1)
        outers, holes = [], []
        for contour in measure.find_contours(padded, 0.5):
            ring = measure.approximate_polygon(contour, tolerance=tolerance_px)
            if len(ring) < 4:
                continue
            xy = (ring[:, ::-1] - 1 + 0.5) * self.downsample  # (row, col) -> (x, y), undo pad, pixel centres
            area = _signed_area(xy)
            (outers if area > 0 else holes).append(xy)
        # skimage orients outlines of foreground one way and of holes the other; sort holes into outers.
        polys = [[o] for o in outers]
        paths = [MplPath(o) for o in outers]
        for hole in holes:
            for poly, path in zip(polys, paths, strict=False):
                if path.contains_point(hole[0]):
                    poly.append(hole)
                    break
        return polys

    def to_geojson(self, path: str | os.PathLike[str] | None = None, name: str = "Tissue") -> dict[str, Any]:
        """A GeoJSON FeatureCollection of tissue polygons in level-0 pixels (QuPath: File › Import objects)."""
        features = []
        for poly in self.polygons():
            rings = [[[round(float(x), 2), round(float(y), 2)] for x, y in ring] for ring in poly]
            for ring in rings:
                if ring[0] != ring[-1]:
                    ring.append(ring[0])
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 160, 0]}},
                }
            )
        collection = {"type": "FeatureCollection", "features": features}
        if path is not None:
            from pathopeft.io import atomic_write_text

            atomic_write_text(Path(path), json.dumps(collection))
        return collection


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def detect_tissue(
    slide: Slide,
    detector: TissueDetector | None = None,
    bad_regions: list[dict] | None = None,
    slide_id: str | None = None,
) -> TissueMask:
    """Run ``detector`` (default: Otsu) on ``slide`` at the detector's working resolution.

    With a ``bad_regions`` list, undecodable parts of the slide are read as background and listed there
    (level-0 rectangles); without one, the first such part raises a :class:`SlideError` naming it. A detector
    with a ``mask_for(slide, slide_id)`` method (outlines from files, :mod:`pathopeft.wsi.tissue_outlines`)
    gives the mask itself.
    """
    from pathopeft.wsi.slide import read_at_mpp

    detector = detector or OtsuTissueDetector()
    if hasattr(detector, "mask_for"):
        return detector.mask_for(slide, slide_id or slide.path.stem)
    image, downsample = read_at_mpp(slide, detector.mpp, bad_regions=bad_regions)
    effective_mpp = slide.mpp * downsample
    return TissueMask(mask=detector.detect(image, effective_mpp), downsample=downsample)
