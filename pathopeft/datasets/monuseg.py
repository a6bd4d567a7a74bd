"""MoNuSeg 2018 (nucleus segmentation, official 30/14 train/test split) as a segmentation manifest."""

from __future__ import annotations

import os
from pathlib import Path

from pathopeft.datasets._manifests import _checked, _rel, _source_rows, _write_manifest


def write_monuseg_manifest(root: str | os.PathLike[str], out_csv: str | os.PathLike[str]) -> Path:
    """Manifest for MoNuSeg (``images/``, ``binary_masks/``, official train/test ``split``).

    ``group`` is the TCGA patient barcode (first three fields of the id), so a held-out val split never
    shares a patient with train. Use ``mask_mode="binary"``: the masks are {0, 255}.
    """
    root, out = Path(root), Path(out_csv)
    rows = []
    for row in _source_rows(root, "MoNuSeg"):
        rid = row["id"]
        rows.append(
            {
                "id": rid,
                "image": _rel(_checked(root / "images" / f"{rid}.png", root / "manifest.csv"), out),
                "mask": _rel(_checked(root / "binary_masks" / f"{rid}.png", root / "manifest.csv"), out),
                "split": row["split"],
                "group": "-".join(rid.split("-")[:3]),
            }
        )
    return _write_manifest(out, rows)
