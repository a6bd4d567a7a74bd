"""A run folder in the layouts CLAM and TRIDENT read, so their training and slide encoders take it as it is.

pathopeft's files already carry both tools' keys and attributes (``coords`` with ``patch_level``/``patch_size``
for CLAM, ``patch_size_level0``/``target_magnification`` for TRIDENT; ``features`` + ``coords`` per slide);
what differs is where the files sit and what they are called:

* ``--to clam``: ``<out>/patches/<id>.h5`` (CLAM's ``create_patches_fp.py`` output) and, per encoder,
  ``<out>/<features folder>/h5_files/<id>.h5`` and ``.../pt_files/<id>.pt`` (the ``(N, D)`` float tensor that
  CLAM's ``Generic_MIL_Dataset`` loads), as ``extract_features_fp.py`` writes them.
* ``--to trident``: TRIDENT's job folder: ``<out>/<mag>x_<px>px_<ov>px_overlap/patches/<id>_patches.h5``,
  ``.../features_<encoder>/<id>.h5`` and ``<out>/contours_geojson/<id>.geojson`` (the tissue outlines).

Files are hard-linked where the file system allows (no extra space), else copied; only finished slides (the
features file exists) are exported, and a slide that fails is reported without stopping the others.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pathopeft.errors import UserError

FORMATS = ("clam", "trident")


class ExportError(UserError, ValueError):
    """The run folder cannot be exported; the message names it and why."""


@dataclass
class ExportReport:
    """What an export wrote: slide ids per encoder folder, and slides that failed with their reason."""

    out_dir: Path
    slides: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _place(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems); replaces an older export's file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _magnification_folder(patches_h5: Path) -> str:
    """TRIDENT's coordinates folder name, ``20x_224px_0px_overlap``, from a coords file's attributes."""
    with h5py.File(patches_h5, "r") as f:
        a = f["coords"].attrs
        mag, px, overlap = float(a["tile_magnification"]), int(a["target_patch_size"]), int(a["overlap"])
    return f"{mag:g}x_{px}px_{overlap}px_overlap"  # 20.0 -> "20", 2.5 -> "2.5", as TRIDENT formats it


def _write_pt(features_h5: Path, dst: Path) -> None:
    import torch

    with h5py.File(features_h5, "r") as f:
        feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".pt.partial")
    torch.save(feats, tmp)
    tmp.replace(dst)


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], to: str) -> ExportReport:
    """Write ``run_dir`` (a ``pathopeft wsi process`` output) in ``to``'s layout under ``out_dir``.

    Raises :class:`ExportError` when ``run_dir`` is not a run folder, holds no features, or ``to`` is unknown.
    """
    run, out = Path(run_dir), Path(out_dir)
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; one of {', '.join(FORMATS)}")
    if not (run / "patches").is_dir():
        raise ExportError(f"{run}: not a pathopeft WSI run folder (no patches/ inside)")
    feature_dirs = sorted(p for p in run.glob("features_*") if p.is_dir())
    if not feature_dirs:
        raise ExportError(f"{run}: no features_*/ folder to export (a tiling-only run?)")
    if out.resolve() == run.resolve():
        raise ExportError(f"{out}: export into another folder than the run itself")
    report = ExportReport(out)
    for fdir in feature_dirs:
        done = report.slides.setdefault(fdir.name, [])
        for features_h5 in sorted(fdir.glob("*.h5")):
            slide_id = features_h5.stem
            patches_h5 = run / "patches" / f"{slide_id}.h5"
            try:
                if not patches_h5.is_file():
                    raise FileNotFoundError(f"{patches_h5} missing")
                if to == "clam":
                    _place(patches_h5, out / "patches" / f"{slide_id}.h5")
                    _place(features_h5, out / fdir.name / "h5_files" / f"{slide_id}.h5")
                    _write_pt(features_h5, out / fdir.name / "pt_files" / f"{slide_id}.pt")
                else:
                    coords_dir = out / _magnification_folder(patches_h5)
                    _place(patches_h5, coords_dir / "patches" / f"{slide_id}_patches.h5")
                    _place(features_h5, coords_dir / fdir.name / f"{slide_id}.h5")
                    geojson = run / "tissue" / f"{slide_id}.geojson"
                    if geojson.is_file():
                        _place(geojson, out / "contours_geojson" / f"{slide_id}.geojson")
            except (OSError, KeyError, ValueError) as e:
                report.failed[f"{fdir.name}/{slide_id}"] = f"{type(e).__name__}: {e}"
                continue
            done.append(slide_id)
    return report
