"""Tile scores as QuPath objects: one square per tile with its score as a measurement, in level-0 pixels.

QuPath (0.4+) opens the file by drag-and-drop or *File › Import objects*; *Measure › Show measurement maps*
then colours the tiles by ``score``, so a pathologist sees a model's localization on the slide itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pathopeft.io import atomic_write_text


def tile_scores_geojson(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_l0: float,
    path: str | os.PathLike[str] | None = None,
    labels: np.ndarray | None = None,
    measurement: str = "score",
) -> dict[str, Any]:
    """A FeatureCollection of tile detections (level-0 squares) with ``measurement`` = score, plus the
    ground-truth label as a second measurement when known; written to ``path`` when given."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (len(coords),):
        raise ValueError(f"scores must be ({len(coords)},) to match coords, got {scores.shape}")
    s = float(tile_size_l0)
    features = []
    for k, (x, y) in enumerate(coords):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        measurements = {measurement: round(float(scores[k]), 6)}
        if labels is not None:
            measurements["tumour (ground truth)"] = int(labels[k])
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[round(a, 2), round(b, 2)] for a, b in ring]]},
            "properties": {"objectType": "detection", "measurements": measurements},
        })  # fmt: skip
    collection = {"type": "FeatureCollection", "features": features}
    if path is not None:
        atomic_write_text(Path(path), json.dumps(collection))
    return collection
