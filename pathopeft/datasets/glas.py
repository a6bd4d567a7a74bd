"""The 22-image GlaS subset (gland segmentation, official test images) as a segmentation manifest."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pathopeft.datasets._manifests import _checked, _rel, _source_rows, _write_manifest
from pathopeft.seg.data import SPLITS


def write_glas_manifest(
    root: str | os.PathLike[str], out_csv: str | os.PathLike[str], split_map: Mapping[str, str] | None = None
) -> Path:
    """Manifest for the 22-image GlaS subset (``images/*.jpg``, ``masks/*.png`` {0, 255}).

    All 22 are official GlaS *test* images (testA/testB), so every row is ``test`` unless ``split_map`` maps
    the ``glas_split`` (``testA``/``testB``) elsewhere — e.g. ``{"testA": "train", "testB": "test"}`` for an
    overfit-a-few-images fixture. ``glas_split`` is kept as an extra column.
    """
    root, out = Path(root), Path(out_csv)
    mapping = dict(split_map or {})
    rows = []
    for row in _source_rows(root, "GlaS"):
        rid, official = row["id"], row["glas_split"]
        split = mapping.get(official, "test")
        if split not in SPLITS:
            raise ValueError(f"split_map sends {official!r} to {split!r}, not one of {list(SPLITS)}")
        rows.append(
            {
                "id": rid,
                "image": _rel(_checked(root / "images" / f"{rid}.jpg", root / "manifest.csv"), out),
                "mask": _rel(_checked(root / "masks" / f"{rid}.png", root / "manifest.csv"), out),
                "split": split,
                "glas_split": official,
            }
        )
    return _write_manifest(out, rows)
