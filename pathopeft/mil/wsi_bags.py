"""Bag manifests from a WSI run: the link between ``wsi process`` and ``mil run``.

The slide manifest a user keeps (``slide_id,path[,mpp],label,task,split``) plus the features folder of a
finished WSI run give the bag manifest the continual runner reads (``slide_id,path,label,task,split``, paths
relative to the bag manifest). Slides whose WSI status is not ``done`` (skipped for no mpp, failed, still
pending) are left out and returned with their reason, never silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from pathopeft.io import atomic_write_text
from pathopeft.manifest import read_rows

SLIDE_COLUMNS = ("slide_id", "path", "label", "task", "split")


def write_bag_manifest(
    slides_csv: str | os.PathLike[str],
    wsi_dir: str | os.PathLike[str],
    features_dir: str,
    out_csv: str | os.PathLike[str],
) -> tuple[Path, list[dict[str, str]]]:
    """Write ``out_csv`` for the slides of ``slides_csv`` whose features exist in ``wsi_dir/features_dir``.

    Returns the manifest path and the slides left out (``slide_id``, ``status``, ``reason``).
    """
    rows = read_rows(slides_csv, SLIDE_COLUMNS, optional=("mpp",))
    root, out = Path(wsi_dir), Path(out_csv)
    kept, left_out = [], []
    for row in rows:
        sid = row["slide_id"]
        status_file = root / "status" / f"{sid}.json"
        try:
            status = json.loads(status_file.read_text())
        except (OSError, json.JSONDecodeError):
            status = {"status": "pending"}
        h5 = root / features_dir / f"{sid}.h5"
        if status.get("status") != "done" or not h5.is_file():
            reason = status.get("reason") or status.get("error") or "no features file"
            left_out.append({"slide_id": sid, "status": str(status.get("status")), "reason": reason})
            continue
        rel = os.path.relpath(h5.resolve(), out.resolve().parent)
        kept.append([sid, Path(rel).as_posix(), row["label"], row["task"], row["split"]])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SLIDE_COLUMNS)
    writer.writerows(kept)
    atomic_write_text(out, buf.getvalue())
    return out, left_out
