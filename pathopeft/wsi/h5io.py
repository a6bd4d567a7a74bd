"""HDF5 files that CLAM's and TRIDENT's loaders read, written atomically.

Layout (one file per slide):

* patches file ``<slide_id>.h5``: dataset ``coords`` (N, 2) int64, level-0 top-left (x, y);
* features file ``<slide_id>.h5``: datasets ``features`` (N, D) float32 and the same ``coords``.

``coords`` carries the union of CLAM's and TRIDENT's attributes. CLAM reads ``patch_size`` pixels at
``patch_level`` and shrinks by ``custom_downsample``; TRIDENT reads ``patch_size_level0`` level-0 pixels.
When the target resolution is a pyramid level (the usual case) ``patch_size`` equals the tile size at the
target; otherwise ``patch_size`` is the read size at ``patch_level`` (CLAM's meaning) and ``target_patch_size``
holds the tile size at the target. Our own attributes: ``target_mpp``, ``level0_mpp``, the tissue detector
and its parameters, ``params_hash`` (resume key) and ``pathopeft_version``.

Files are written to a temporary name and renamed into place, so a killed job never leaves a file that
looks finished.
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
from pathopeft.wsi.resolution import mpp_to_mag
from pathopeft.wsi.tiling import TileGrid


def params_hash(params: Mapping[str, Any]) -> str:
    """Stable short hash of the parameters that determine a file's content (the resume key)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


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
        "target_magnification": float(mpp_to_mag(grid.target_mpp)),
        "overlap": int(grid.overlap_px),
        "level0_width": int(grid.level0_dimensions[0]),
        "level0_height": int(grid.level0_dimensions[1]),
        # pathopeft
        "target_patch_size": int(grid.tile_px),
        "target_mpp": float(grid.target_mpp),
        "level0_mpp": float(grid.level0_mpp),
    }


def _write(
    path: Path, datasets: Mapping[str, np.ndarray], coords_meta: Mapping[str, Any], root_meta: Mapping[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
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
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
) -> None:
    """Atomically write a features file (``features`` (N, D) float32 + ``coords`` (N, 2) int64)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"{path}: features {features.shape} do not match coords {coords.shape}")
    _write(Path(path), {"features": features, "coords": coords}, coords_meta, root_meta)


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
