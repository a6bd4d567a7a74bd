"""Quality-control pictures per slide and a per-batch summary a person can read.

The per-slide PNG shows the thumbnail with tissue contours (green) and the kept tile grid (blue), the two
things that go wrong silently in tiling. The summary (Markdown) counts done/skipped/failed slides, lists
every failure with its error and every skip with its reason, and sums tiles and time.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from pathopeft.io import atomic_write_bytes, atomic_write_text
from pathopeft.wsi.tiling import TileGrid
from pathopeft.wsi.tissue import TissueMask

if TYPE_CHECKING:
    from pathopeft.wsi.slide import Slide


def render_qc(slide: Slide, tissue: TissueMask | None, grid: TileGrid | None, max_size: int = 1024) -> Image.Image:
    """Thumbnail of ``slide`` with tissue contours and tile outlines drawn on it."""
    thumb = slide.thumbnail(max_size)
    scale = thumb.shape[1] / slide.dimensions[0]  # thumbnail px per level-0 px
    img = Image.fromarray(thumb).convert("RGB")
    draw = ImageDraw.Draw(img, "RGBA")
    if grid is not None and len(grid):
        size = grid.tile_size_l0 * scale
        for x, y in grid.coords:
            x0, y0 = x * scale, y * scale
            draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(30, 90, 255, 200), width=1)
    if tissue is not None:
        for poly in tissue.polygons():
            for k, ring in enumerate(poly):
                pts = [(float(px * scale), float(py * scale)) for px, py in ring]
                draw.line([*pts, pts[0]], fill=(0, 170, 0, 255) if k == 0 else (220, 120, 0, 255), width=2)
    return img


def save_slide_qc(
    slide: Slide, tissue: TissueMask | None, grid: TileGrid | None, path: str | os.PathLike[str]
) -> None:
    """Write :func:`render_qc` as PNG atomically."""
    buf = io.BytesIO()
    render_qc(slide, tissue, grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_records(root: Path, slide_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Status records under ``root/status`` (all of them, or those of ``slide_ids`` in that order)."""
    status_dir = root / "status"
    files = sorted(status_dir.glob("*.json")) if slide_ids is None else [status_dir / f"{s}.json" for s in slide_ids]
    records = []
    for f in files:
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            records.append({"slide_id": f.stem, "status": "pending"})
    return records


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_summary(root: str | os.PathLike[str], slide_ids: list[str] | None = None) -> str:
    """Write ``summary.md`` and ``failures.csv`` from the status records; returns the Markdown."""
    root = Path(root)
    records = load_records(root, slide_ids)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("status", "pending")] = counts.get(r.get("status", "pending"), 0) + 1
    done = [r for r in records if r.get("status") == "done"]
    tiles = sum(int(r.get("n_tiles", 0)) for r in done)
    extract_s = sum(float(r.get("timings", {}).get("extract_s", 0.0)) for r in done)
    total_s = sum(float(r.get("timings", {}).get("total_s", 0.0)) for r in done)
    lines = [
        "# pathopeft WSI batch summary",
        "",
        f"Output folder: `{root}`",
        "",
        "| slides | done | skipped | failed | pending | tiles | total time (s) | extraction tiles/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| {len(records)} | {counts.get('done', 0)} | {counts.get('skipped', 0)} | {counts.get('failed', 0)} "
            f"| {counts.get('pending', 0)} | {tiles} | {total_s:.1f} | {(tiles / extract_s if extract_s else 0):.1f} |"
        ),
        "",
        "## Slides",
        "",
        "| slide | status | reason / error | mpp (source) | level | tiles | tissue % | time (s) | QC |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        why = r.get("reason") or r.get("error") or ""
        mpp = (
            f"{_fmt(r.get('level0_mpp'), 3)} ({r.get('mpp_source', '')})"
            if r.get("level0_mpp")
            else r.get("mpp_source", "")
        )
        qc = f"![qc](qc/{r['slide_id']}.png)" if (root / "qc" / f"{r['slide_id']}.png").exists() else ""
        tissue = _fmt(100 * r["tissue_fraction"], 1) if "tissue_fraction" in r else ""
        lines.append(
            f"| {r['slide_id']} | {r.get('status', 'pending')} | {why.replace('|', '/')[:200]} | {mpp} | "
            f"{_fmt(r.get('level'))} | {_fmt(r.get('n_tiles'))} | {tissue} | "
            f"{_fmt(r.get('timings', {}).get('total_s'))} | {qc} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(root / "summary.md", text)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["slide_id", "path", "status", "reason_or_error"])
    for r in records:
        if r.get("status") in ("failed", "skipped", "pending"):
            writer.writerow(
                [r["slide_id"], r.get("path", ""), r.get("status"), r.get("reason") or r.get("error") or ""]
            )
    atomic_write_text(root / "failures.csv", buf.getvalue())
    return text


def tile_mosaic(tiles: list[np.ndarray], columns: int = 8) -> Image.Image:
    """A grid of tiles (for eyeballing what the extractor saw)."""
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for k, t in enumerate(tiles):
        canvas.paste(Image.fromarray(t), ((k % columns) * w, (k // columns) * h))
    return canvas
