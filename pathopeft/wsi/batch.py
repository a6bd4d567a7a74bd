"""Run tissue → tiles → features over a manifest, resumably, one slide at a time.

Guarantees:

* **Resume** — a slide whose files carry the same parameter hash is not redone; skipped and failed slides are
  tried again on the next run.
* **Atomic outputs** — H5/GeoJSON/PNG are written to a temporary name and renamed, and a slide's status record
  is written last, so a killed job never leaves a file that looks finished.
* **Isolation** — an exception inside one slide becomes a ``failed`` record with the error; the batch goes on.
* **Sharding** — ``shard=(i, n)`` takes every n-th slide (job arrays); the distributed launcher composes its
  rank with it.

Output layout under ``out_dir``::

    patches/<slide_id>.h5        coords (CLAM/TRIDENT)
    features_<backbone>/<slide_id>.h5
    tissue/<slide_id>.geojson    QuPath-importable contours
    qc/<slide_id>.png            thumbnail, contours and tile grid
    status/<slide_id>.json       done | skipped | failed, reason, timings
    summary.md, failures.csv     rebuilt from all status records at the end
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pathopeft import __version__
from pathopeft.backbones import Backbone, apply_adapter, create_backbone
from pathopeft.wsi import h5io
from pathopeft.wsi.config import BatchConfig, SlideEntry
from pathopeft.wsi.extract import extract_features
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tiling import tile_grid
from pathopeft.wsi.tissue import create_detector, detect_tissue

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


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
    return f"features_{backbone}" if backbone else None


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


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(paths: OutputPaths, patches_hash: str, features_hash: str | None) -> bool:
    """True when the status says done and the files on disk carry the expected hashes."""
    status = read_status(paths.status)
    if not status or status.get("status") != DONE or status.get("params_hash") != (features_hash or patches_hash):
        return False
    if h5io.read_hash(paths.patches) != patches_hash:
        return False
    return features_hash is None or h5io.read_hash(paths.features) == features_hash


def _clean_stale_temporaries(root: Path) -> None:
    """Remove temporary files left by a killed run (they were never renamed into place)."""
    for sub in root.iterdir() if root.exists() else ():
        if sub.is_dir():
            for tmp in sub.glob(".*.tmp*"):
                tmp.unlink(missing_ok=True)


def process_slide(
    entry: SlideEntry,
    cfg: BatchConfig,
    backbone: Backbone | None,
    hashes: tuple[str, str | None],
    progress: Any = None,
) -> dict[str, Any]:
    """Run one slide end to end and return its status record (exceptions propagate to the caller)."""
    t = cfg.tiling
    paths = OutputPaths(Path(cfg.out_dir), entry.slide_id, features_dirname(cfg.extract.backbone))
    record: dict[str, Any] = {"slide_id": entry.slide_id, "path": str(entry.path)}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_slide(entry.path, mpp=entry.mpp) as slide:
        info = slide.mpp_info
        record.update(backend=slide.backend, level0_mpp=info.mpp, mpp_source=info.source, dimensions=slide.dimensions)
        if info.mpp is None:
            record.update(status=SKIPPED, reason="no mpp")
            return record
        detector = create_detector(t.tissue, **t.tissue_params)
        tissue = detect_tissue(slide, detector)
        timings["tissue_s"] = time.perf_counter() - t0
        tissue.to_geojson(paths.geojson)
        grid = tile_grid(
            slide.dimensions, slide.level_downsamples, info.mpp, t.target_mpp,
            t.tile_px, t.overlap_px, tissue, t.min_tissue_fraction,
        )  # fmt: skip
        coords_meta = h5io.coords_attrs(grid, entry.slide_id, slide.level_dimensions)
        root_meta = {
            "params_hash": hashes[0],
            "tissue_method": detector.name,
            "tissue_params": json.dumps(detector.params()),
            "tissue_fraction": tissue.fraction,
            "mpp_source": info.source,
            "slide_path": str(entry.path),
        }
        h5io.write_patches(paths.patches, grid.coords, coords_meta, root_meta)
        timings["tiling_s"] = time.perf_counter() - t0 - timings["tissue_s"]
        record.update(
            n_tiles=len(grid), level=grid.choice.level, read_px=grid.read_px, tissue_fraction=tissue.fraction
        )
        if backbone is not None:
            t1 = time.perf_counter()
            e = cfg.extract
            feats, coords = extract_features(
                entry.path, grid, backbone, batch_size=e.batch_size, num_workers=e.num_workers, device=e.device,
                precision=e.precision, skip_bad_tiles=e.skip_bad_tiles,
                on_batch=(progress.update if progress is not None else None),
            )  # fmt: skip
            timings["extract_s"] = time.perf_counter() - t1
            h5io.write_features(
                paths.features, feats, coords, coords_meta,
                {**root_meta, "params_hash": hashes[1], "encoder": backbone.name,
                 "encoder_weights": backbone.weights or "random-init", "feature_dim": backbone.dim},
            )  # fmt: skip
            record.update(n_features=len(feats), feature_dim=backbone.dim, encoder=backbone.name)
            if timings["extract_s"] > 0:
                record["tiles_per_s"] = len(feats) / timings["extract_s"]
        if cfg.qc:
            from pathopeft.wsi.qc import save_slide_qc

            save_slide_qc(slide, tissue, grid, paths.qc)
    record.update(status=DONE)
    timings["total_s"] = time.perf_counter() - t0
    record["timings"] = timings
    return record


def shard_entries(entries: list[SlideEntry], shard: tuple[int, int]) -> list[SlideEntry]:
    """Every n-th entry starting at i (deterministic, independent of what is already done)."""
    i, n = shard
    return [e for k, e in enumerate(entries) if k % n == i]


def load_backbone(cfg: BatchConfig) -> Backbone | None:
    e = cfg.extract
    if not e.backbone:
        return None
    bb = create_backbone(e.backbone, weights=e.weights, mean=e.mean, std=e.std, **e.backbone_kwargs)
    if e.adapter:
        bb = apply_adapter(bb, e.adapter)
    return bb


def run_batch(entries: list[SlideEntry], cfg: BatchConfig, backbone: Backbone | None = None) -> list[dict[str, Any]]:
    """Process this shard's slides and rebuild the batch summary; returns this run's status records.

    Args:
        entries: manifest rows (see :func:`pathopeft.wsi.config.read_manifest`).
        cfg: the job settings.
        backbone: a prebuilt backbone (otherwise built from ``cfg.extract``; ``None`` there = tiling only).
    """
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(root)
    h5io.atomic_write_text(
        root / "config.json", json.dumps({**cfg.to_dict(), "pathopeft_version": __version__}, indent=2, default=str)
    )
    hashes = job_hashes(cfg)
    mine = shard_entries(entries, cfg.shard)
    todo = [
        e for e in mine if not is_done(OutputPaths(root, e.slide_id, features_dirname(cfg.extract.backbone)), *hashes)
    ]
    log.info(
        "%d slides in shard %d/%d, %d already done, %d to process",
        len(mine),
        *cfg.shard,
        len(mine) - len(todo),
        len(todo),
    )
    if todo and backbone is None and cfg.extract.backbone:
        backbone = load_backbone(cfg)
    records = []
    slides_bar = tqdm(todo, desc="slides", unit="slide", disable=not cfg.progress, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not cfg.progress or backbone is None, position=1, leave=False)
    for entry in slides_bar:
        slides_bar.set_postfix_str(entry.slide_id)
        started = time.time()
        try:
            record = process_slide(entry, cfg, backbone, hashes, progress=tiles_bar)
        except Exception as e:  # noqa: BLE001 - one bad slide must never stop the batch
            log.warning("%s failed: %s: %s", entry.slide_id, type(e).__name__, e)
            record = {"slide_id": entry.slide_id, "path": str(entry.path), "status": FAILED,
                      "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}  # fmt: skip
        record.update(
            params_hash=hashes[1] or hashes[0], started_at=started, finished_at=time.time(),
            shard=list(cfg.shard), host=os.uname().nodename, pid=os.getpid(), pathopeft_version=__version__,
        )  # fmt: skip
        h5io.atomic_write_text(
            OutputPaths(root, entry.slide_id, None).status, json.dumps(record, indent=1, default=str)
        )
        records.append(record)
    tiles_bar.close()
    from pathopeft.wsi.qc import write_summary

    write_summary(root, [e.slide_id for e in entries])
    return records
