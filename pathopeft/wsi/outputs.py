"""Where a batch's outputs live, what makes them "the same job", and the guard that keeps jobs apart.

Output layout under ``out_dir``::

    patches/<slide_id>.h5              coords (CLAM/TRIDENT)
    features_<encoder>/<slide_id>.h5   features + coords
    tissue/<slide_id>.geojson          QuPath-importable contours
    qc/<slide_id>.png                  thumbnail, contours and tile grid
    status/<slide_id>.json             done | skipped | failed, reason, timings
    claims/<slide_id>.claim            held while a job works on the slide
    params.json                        the tiling parameters (and each features folder's encoder) of this folder
    summary.md, failures.csv           rebuilt from all status records at the end

One folder holds one tiling (``patches/``, ``tissue/``, ``qc/`` are per slide, not per parameter set) and, per
features folder, one encoder. A run with other parameters into the same folder would replace earlier results
slide by slide, so :func:`guard_parameters` refuses it up front, naming what differs, unless ``overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathopeft.backbones import safe_name
from pathopeft.errors import UserError
from pathopeft.io import atomic_write_json
from pathopeft.wsi import h5io
from pathopeft.wsi.config import BatchConfig
from pathopeft.wsi.tissue import create_detector

PARAMS_NAME = "params.json"


class OutputConflictError(UserError):
    """The output folder holds results made with other parameters."""


@dataclass(frozen=True)
class OutputPaths:
    """Where one slide's outputs go."""

    root: Path
    slide_id: str
    features_dir: str | None

    @property
    def patches(self) -> Path:
        return self.root / "patches" / f"{self.slide_id}.h5"

    @property
    def features(self) -> Path | None:
        return self.root / self.features_dir / f"{self.slide_id}.h5" if self.features_dir else None

    @property
    def geojson(self) -> Path:
        return self.root / "tissue" / f"{self.slide_id}.geojson"

    @property
    def qc(self) -> Path:
        return self.root / "qc" / f"{self.slide_id}.png"

    @property
    def status(self) -> Path:
        return self.root / "status" / f"{self.slide_id}.json"


def features_dirname(backbone: str | None) -> str | None:
    return f"features_{safe_name(backbone)}" if backbone else None


def tiling_params(cfg: BatchConfig) -> dict[str, Any]:
    """Everything that changes the coords (the patches file's resume key)."""
    t = cfg.tiling
    detector = create_detector(t.tissue, **t.tissue_params)
    return {
        "target_mpp": t.target_mpp,
        "tile_px": t.tile_px,
        "overlap_px": t.overlap_px,
        "min_tissue_fraction": t.min_tissue_fraction,
        "tissue": detector.name,
        "tissue_params": detector.params(),
    }


def job_hashes(cfg: BatchConfig) -> tuple[str, str | None]:
    """(patches hash, features hash or None when no backbone is set)."""
    tp = tiling_params(cfg)
    patches = h5io.params_hash(tp)
    features = h5io.params_hash({"tiling": tp, "extract": cfg.extract.identity()}) if cfg.extract.backbone else None
    return patches, features


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} → {b!r}")
    return out


def _foreign_hash(folder: Path, expected: str) -> Path | None:
    """A finished H5 in ``folder`` made with other parameters (for folders written before params.json)."""
    for f in sorted(folder.glob("*.h5")) if folder.is_dir() else ():
        value = h5io.read_hash(f)
        if value is not None and value != expected:
            return f
    return None


def guard_parameters(root: Path, cfg: BatchConfig, overwrite: bool = False) -> None:
    """Refuse to mix parameter sets in one output folder; record this job's parameters in ``params.json``."""
    patches_hash, features_hash = job_hashes(cfg)
    path = root / PARAMS_NAME
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        saved = {}
    tiling = {"params": tiling_params(cfg), "hash": patches_hash}
    fdir = features_dirname(cfg.extract.backbone)
    encoder = {"params": json.loads(json.dumps(cfg.extract.identity(), default=str)), "hash": features_hash}
    hint = "write to another --out, or pass --overwrite to replace them"
    if not overwrite:
        old = saved.get("tiling")
        if old and old.get("hash") != patches_hash:
            diff = "; ".join(_differences(old.get("params", {}), tiling["params"])) or "other parameters"
            raise OutputConflictError(f"{root}: holds tiles made with other tiling parameters ({diff}); {hint}")
        if not old and (bad := _foreign_hash(root / "patches", patches_hash)):
            raise OutputConflictError(f"{bad}: made with other tiling parameters than this job; {hint}")
        old_enc = saved.get("features", {}).get(fdir) if fdir else None
        if old_enc and old_enc.get("hash") != features_hash:
            diff = "; ".join(_differences(old_enc.get("params", {}), encoder["params"])) or "other parameters"
            raise OutputConflictError(f"{root / fdir}: holds features of another encoder setting ({diff}); {hint}")
        if fdir and not old_enc and (bad := _foreign_hash(root / fdir, features_hash)):
            raise OutputConflictError(f"{bad}: made with other encoder settings than this job; {hint}")
    features = dict(saved.get("features", {})) if saved.get("tiling", {}).get("hash") == patches_hash else {}
    if fdir:
        features[fdir] = encoder
    atomic_write_json(path, {"tiling": tiling, "features": features}, indent=2)
