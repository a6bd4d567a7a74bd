"""HDF5 files that CLAM's and TRIDENT's loaders read, written atomically.

Layout (one file per slide):

* patches file ``<slide_id>.h5``: dataset ``coords`` (N, 2) int64, level-0 top-left (x, y);
* features file ``<slide_id>.h5``: datasets ``features`` (N, D) float32 and the same ``coords``.

``coords`` carries the union of CLAM's and TRIDENT's attributes, chosen so both tools' readers fetch exactly
the pixels pathopeft read. They share one name with two meanings: CLAM's ``Whole_Slide_Bag_FP`` reads
``patch_size`` pixels at ``patch_level``; TRIDENT (``WSI.extract_patch_features``, seeing ``patch_size``,
``level0_magnification`` and ``target_magnification``) reads ``patch_size × level0_mag / target_mag`` level-0
pixels at the level matching that ratio and resizes them to ``patch_size``. So ``patch_size`` is the read size
at ``patch_level`` and ``target_magnification`` is the magnification of the pixels read (level-0 magnification
over the level's downsample): then both read the same region at the same level, and leave the last resize to
the encoder's transform, as pathopeft does. When the target is a pyramid level (no resize) these are simply
the tile size and the target magnification. The tile at the target is described by ``target_patch_size``,
``target_mpp`` and ``patch_size_level0`` (the level-0 footprint TRIDENT's slide encoders use). Our own
attributes: ``target_mpp``, ``level0_mpp``, the tissue detector and its parameters, ``params_hash`` (resume
key) and ``pathopeft_version``.

Files are built in memory and written through :mod:`pathopeft.io` (temporary name, atomic rename), so a
killed job never leaves a file that looks finished and a full disk raises instead of crashing HDF5.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathopeft import __version__
from pathopeft.io import atomic_h5
from pathopeft.wsi.resolution import mpp_to_mag
from pathopeft.wsi.tiling import TileGrid


def params_hash(params: Mapping[str, Any]) -> str:
    """Stable short hash of the parameters that determine a file's content (the resume key)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def coords_attrs(grid: TileGrid, slide_id: str, level_dimensions: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """The ``coords`` attributes CLAM and TRIDENT expect, plus ours."""
    level = grid.choice.level
    ds = grid.choice.level_downsample
    return {
        # CLAM
        "patch_size": int(grid.read_px),
        "patch_level": int(level),
        "downsample": np.array([ds, ds], dtype=np.float64),
        "downsampled_level_dim": np.array(level_dimensions[level], dtype=np.int64),
        "level_dim": np.array(level_dimensions[level], dtype=np.int64),
        "custom_downsample": float(grid.choice.resize_factor),
        "name": slide_id,
        # TRIDENT
        "patch_size_level0": round(grid.tile_size_l0),
        "level0_magnification": float(mpp_to_mag(grid.level0_mpp)),
        # TRIDENT reads patch_size * level0_mag / target_mag level-0 px: the magnification of the pixels read
        "target_magnification": float(mpp_to_mag(grid.level0_mpp * ds)),
        "overlap": int(grid.overlap_px),
        "level0_width": int(grid.level0_dimensions[0]),
        "level0_height": int(grid.level0_dimensions[1]),
        # pathopeft
        "target_patch_size": int(grid.tile_px),
        "target_mpp": float(grid.target_mpp),
        "tile_magnification": float(mpp_to_mag(grid.target_mpp)),
        "level0_mpp": float(grid.level0_mpp),
    }


def _write(
    path: Path,
    datasets: Mapping[str, np.ndarray],
    coords_meta: Mapping[str, Any],
    root_meta: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    with atomic_h5(path) as f:
        for name, data in datasets.items():
            # chunked + resizable like CLAM's writer, so downstream tools can append
            maxshape = (None, *data.shape[1:])
            chunks = (max(1, min(len(data), 1024)), *data.shape[1:]) if len(data) else None
            f.create_dataset(name, data=data, maxshape=maxshape, chunks=chunks)
        for k, v in coords_meta.items():
            f["coords"].attrs[k] = v
        for k, v in root_meta.items():
            f.attrs[k] = v
        f.attrs["pathopeft_version"] = __version__
        for name, value in (extra or {}).items():  # per-tile extras (labels, tile paths): plain datasets
            is_text = len(value) > 0 and isinstance(next(iter(value)), str)
            f.create_dataset(name, data=value, dtype=h5py.string_dtype() if is_text else None)


def write_patches(
    path: str | os.PathLike[str], coords: np.ndarray, coords_meta: Mapping[str, Any], root_meta: Mapping[str, Any]
) -> None:
    """Atomically write a patches (coords-only) file."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    _write(Path(path), {"coords": coords}, coords_meta, root_meta)


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    coords_meta: Mapping[str, Any],
    root_meta: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write a features file (``features`` (N, D) float32 + ``coords`` (N, 2) int64).

    ``extra``: more per-tile datasets (e.g. ``instance_labels``, ``tile_paths``), one row per tile.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"{path}: features {features.shape} do not match coords {coords.shape}")
    for name, value in (extra or {}).items():
        if len(value) != len(coords):
            raise ValueError(f"{path}: {name} has {len(value)} rows, coords {len(coords)}")
    _write(Path(path), {"features": features, "coords": coords}, coords_meta, root_meta, extra)


def read_hash(path: str | os.PathLike[str]) -> str | None:
    """The ``params_hash`` stored in a finished file, or ``None`` if absent/unreadable."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("params_hash")
    except (OSError, KeyError):
        return None
    return value.decode() if isinstance(value, bytes) else value


def read_coords(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """``coords`` and its attributes from a patches or features file (ours, CLAM's or TRIDENT's)."""
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise KeyError(f"{path}: no 'coords' dataset")
        return f["coords"][:], dict(f["coords"].attrs)


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, D), coords (N, 2))`` from a features file."""
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise KeyError(f"{path}: no 'features' dataset")
        coords = f["coords"][:] if "coords" in f else np.zeros((len(f["features"]), 2), dtype=np.int64)
        return f["features"][:], coords
