"""Run tissue → tiles → features over a manifest, resumably, one slide at a time.

Guarantees:

* **Resume** — a slide whose files carry the same parameter hash is not redone; skipped and failed slides are
  tried again on the next run.
* **Atomic outputs** — H5/GeoJSON/PNG are written to a temporary name and renamed, and a slide's status record
  is written last, so a killed job never leaves a file that looks finished.
* **Isolation** — an exception inside one slide becomes a ``failed`` record with the error; the batch goes on.
* **Sharding** — ``shard=(i, n)`` takes every n-th slide (job arrays); the distributed launcher composes its
  rank with it.

* **Sharing** — several jobs on one ``out_dir`` (job arrays, a second terminal) claim slides one at a time
  (:mod:`pathopeft.wsi.claims`), so no slide is computed twice and nobody deletes another job's temporaries.
* **Disk full** — ENOSPC ends the batch with :class:`~pathopeft.errors.DiskFullError` naming the file; the
  slide in progress leaves nothing behind and a rerun after freeing space finishes the rest.

Layout and the guard against mixing parameter sets in one folder: :mod:`pathopeft.wsi.outputs`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pathopeft import __version__
from pathopeft.backbones import Backbone, apply_adapter, create_backbone
from pathopeft.errors import DiskFullError
from pathopeft.io import atomic_write_json, clean_stale_temporaries, is_disk_full
from pathopeft.wsi import claims, h5io, tissue_outlines  # noqa: F401  # tissue_outlines registers "geojson"
from pathopeft.wsi.config import BatchConfig, SlideEntry
from pathopeft.wsi.extract import extract_features
from pathopeft.wsi.outputs import OutputPaths, features_dirname, guard_parameters, job_hashes
from pathopeft.wsi.resolution import mpp_problem
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tiling import tile_grid
from pathopeft.wsi.tissue import create_detector, detect_tissue

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


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
        if info.rejected:
            record["mpp_rejected"] = info.rejected
        problem = mpp_problem(info, t.target_mpp)
        if problem:
            record.update(status=SKIPPED, reason=problem)
            return record
        detector = create_detector(t.tissue, **t.tissue_params)
        bad_regions: list[dict] | None = [] if cfg.extract.skip_bad_tiles else None
        tissue = detect_tissue(slide, detector, bad_regions, entry.slide_id)
        if bad_regions:
            log.warning("%s: %d unreadable regions read as background, first at %s", entry.slide_id,
                        len(bad_regions), bad_regions[0]["error"])  # fmt: skip
            record["bad_regions"] = bad_regions
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
                on_batch=(progress.update if progress is not None else None), read_threads=e.read_threads,
            )  # fmt: skip
            timings["extract_s"] = time.perf_counter() - t1
            h5io.write_features(
                paths.features, feats, coords, coords_meta,
                {**root_meta, "params_hash": hashes[1], "encoder": backbone.name, "reader": slide.backend,
                 "resample_filter": slide.resample_filter(grid.choice.level, grid.read_px, grid.tile_px, grid.coords),
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


def tile_size_warnings(cfg: BatchConfig, backbone: Backbone | None) -> list[str]:
    """Settings that are legal but almost certainly not meant (logged at the start of the batch)."""
    px = cfg.tiling.tile_px
    out = []
    if backbone is not None and not 0.5 <= px / backbone.input_size <= 2.0:
        out.append(
            f"tile_px {px} is far from {backbone.name}'s input size {backbone.input_size}: every tile is resized "
            f"{backbone.input_size / px:.2g}× before the encoder; use --tile-px {backbone.input_size} unless meant"
        )
    elif backbone is None and px < 32:
        out.append(f"tile_px {px} gives tiles of {px * cfg.tiling.target_mpp:g} µm: far smaller than a cell")
    return out


def _disk_full(e: BaseException, entry: SlideEntry, finished: int, left: int) -> DiskFullError:
    first = str(e) if isinstance(e, DiskFullError) else f"disk full ({e})"
    return DiskFullError(
        f"{first} while processing slide {entry.slide_id}; the {finished} slides finished in this run are intact, "
        f"{left} left: free space and rerun the same command to finish"
    )


def run_batch(entries: list[SlideEntry], cfg: BatchConfig, backbone: Backbone | None = None) -> list[dict[str, Any]]:
    """Process this shard's slides and rebuild the batch summary; returns this run's status records.

    Args:
        entries: manifest rows (see :func:`pathopeft.wsi.config.read_manifest`).
        cfg: the job settings.
        backbone: a prebuilt backbone (otherwise built from ``cfg.extract``; ``None`` there = tiling only).

    Raises:
        OutputConflictError: ``out_dir`` holds results of other parameters (and ``cfg.overwrite`` is off).
        DiskFullError: the disk filled up; every slide finished before is intact.
    """
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    guard_parameters(root, cfg, overwrite=cfg.overwrite)
    clean_stale_temporaries(root)  # only those whose writer is gone: a concurrent job keeps its own
    hashes = job_hashes(cfg)
    fdir = features_dirname(cfg.extract.backbone)
    mine = shard_entries(entries, cfg.shard)
    todo = [e for e in mine if not is_done(OutputPaths(root, e.slide_id, fdir), *hashes)]
    log.info("%d slides in shard %d/%d, %d already done, %d to process", len(mine), *cfg.shard,
             len(mine) - len(todo), len(todo))  # fmt: skip
    if todo and backbone is None and cfg.extract.backbone:
        backbone = load_backbone(cfg)
    warnings = tile_size_warnings(cfg, backbone)
    for w in warnings:
        log.warning("%s", w)
    atomic_write_json(root / "config.json", {**cfg.to_dict(), "warnings": warnings, "pathopeft_version": __version__},
                      indent=2)  # fmt: skip
    records: list[dict[str, Any]] = []
    slides_bar = tqdm(todo, desc="slides", unit="slide", disable=not cfg.progress, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not cfg.progress or backbone is None, position=1, leave=False)
    for k, entry in enumerate(slides_bar):
        slides_bar.set_postfix_str(entry.slide_id)
        if not claims.try_claim(root, entry.slide_id):
            log.info("%s: being processed by %s; left to it", entry.slide_id, claims.holder(root, entry.slide_id))
            continue
        try:
            if is_done(OutputPaths(root, entry.slide_id, fdir), *hashes):  # another job finished it meanwhile
                continue
            started = time.time()
            try:
                record = process_slide(entry, cfg, backbone, hashes, progress=tiles_bar)
            except Exception as e:  # noqa: BLE001 - one bad slide must never stop the batch
                if is_disk_full(e):
                    raise _disk_full(e, entry, len(records), len(todo) - k) from None
                log.warning("%s failed: %s: %s", entry.slide_id, type(e).__name__, e)
                record = {"slide_id": entry.slide_id, "path": str(entry.path), "status": FAILED,
                          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}  # fmt: skip
            record.update(
                params_hash=hashes[1] or hashes[0], started_at=started, finished_at=time.time(),
                shard=list(cfg.shard), host=os.uname().nodename, pid=os.getpid(), pathopeft_version=__version__,
            )  # fmt: skip
            try:
                atomic_write_json(OutputPaths(root, entry.slide_id, None).status, record)
            except DiskFullError as e:
                raise _disk_full(e, entry, len(records), len(todo) - k) from None
            records.append(record)
        finally:
            claims.release(root, entry.slide_id)
    tiles_bar.close()
    from pathopeft.wsi.qc import write_summary

    write_summary(root, [e.slide_id for e in entries])
    return records
