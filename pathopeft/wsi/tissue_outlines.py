"""Tissue outlines drawn elsewhere as the tissue mask: QuPath annotations or TRIDENT's ``contours_geojson``.

``--tissue-geojson DIR`` reads ``DIR/<slide_id>.geojson`` (QuPath: *File › Export objects as GeoJSON*, a
FeatureCollection or a bare list of features; TRIDENT: its ``contours_geojson/``), takes every Polygon and
MultiPolygon in level-0 pixels, holes included, and rasterises them at ``mpp`` µm/px into the same
:class:`~pathopeft.wsi.tissue.TissueMask` the detectors return, so tiling, tissue fractions and QC are unchanged.
Annotations classified ``Ignore*`` or ``Other`` in QuPath are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pathopeft.wsi.slide_base import SlideError
from pathopeft.wsi.tissue import TISSUE_DETECTORS, TissueMask

if TYPE_CHECKING:
    from pathopeft.wsi.slide_base import Slide

SKIPPED_CLASSES = ("ignore", "other")


class OutlineError(SlideError):
    """A slide's outline file is missing or unreadable; the message names it."""


def _polygons(doc: Any, path: Path) -> list[list[list[list[float]]]]:
    """Polygons (rings of [x, y]) of a GeoJSON document, Feature(Collection) or a list of features."""
    features = doc.get("features", [doc]) if isinstance(doc, dict) else doc
    if not isinstance(features, list):
        raise OutlineError(f"{path}: not GeoJSON features (found {type(features).__name__})")
    polys = []
    for feat in features:
        if not isinstance(feat, dict):
            continue
        props = feat.get("properties") or {}
        cls = props.get("classification") or {}
        if isinstance(cls, dict) and str(cls.get("name", "")).lower().startswith(SKIPPED_CLASSES):
            continue
        geom = feat.get("geometry") if feat.get("type") == "Feature" else feat
        if not isinstance(geom, dict):
            continue
        if geom.get("type") == "Polygon":
            polys.append(geom["coordinates"])
        elif geom.get("type") == "MultiPolygon":
            polys.extend(geom["coordinates"])
    return polys


@TISSUE_DETECTORS.register("geojson")
@dataclass
class OutlineTissue:
    """The tissue mask of each slide from ``folder/<slide_id>.geojson`` (level-0 pixel coordinates)."""

    folder: str = ""
    mpp: float = 8.0
    name: str = field(default="geojson", init=False)

    def params(self) -> dict[str, Any]:
        return {"folder": str(Path(self.folder).resolve()), "mpp": self.mpp, "name": self.name}

    def detect(self, image: np.ndarray, mpp: float) -> np.ndarray:
        raise OutlineError("outline tissue masks come from files: use mask_for(slide, slide_id)")

    def mask_for(self, slide: Slide, slide_id: str) -> TissueMask:
        """The outlines of ``slide_id`` rasterised at (about) ``mpp`` µm/px over the whole slide."""
        path = Path(self.folder) / f"{slide_id}.geojson"
        if not path.is_file():
            raise OutlineError(f"{path}: no tissue outline file for slide {slide_id!r}")
        try:
            polys = _polygons(json.loads(path.read_text()), path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutlineError(f"{path}: unreadable GeoJSON ({e})") from e
        if slide.mpp is None:
            raise OutlineError(f"{slide.path}: no µm/px, so the outline mask resolution is unknown")
        downsample = max(1.0, self.mpp / slide.mpp)
        w, h = slide.dimensions
        mask = np.zeros((max(1, round(h / downsample)), max(1, round(w / downsample))), np.uint8)
        for rings in polys:
            scaled = [
                np.round(np.asarray(r, dtype=np.float64)[:, :2] / downsample - 0.5).astype(np.int32)
                for r in rings
                if len(r) >= 3
            ]
            if scaled:
                cv2.fillPoly(mask, scaled[:1], 1)  # the outer ring
                if len(scaled) > 1:
                    cv2.fillPoly(mask, scaled[1:], 0)  # its holes
        return TissueMask(mask=mask.astype(bool), downsample=downsample)
