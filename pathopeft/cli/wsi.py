"""``pathopeft wsi process|tile|info|qc``: the WSI stage from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pathopeft.errors import UserError

WSI_EPILOG = """\
resolution: give the physical resolution you want tiles at, never a pyramid level:
  --mpp 0.5   (micrometres per pixel)   or   --mag 20   (= 10/20 = 0.5 µm/px)
  The highest-resolution pyramid level not finer than needed is read and resized exactly to the target.
  Slide mpp comes from the file (openslide.mpp-x, TIFF resolution tags, objective power) or else from an
  'mpp' column in the manifest; slides with none are skipped with reason "no mpp", never guessed.

manifest CSV columns: slide_id,path[,mpp][,label][,task]   (relative paths are relative to the CSV)

examples:
  pathopeft wsi process --sample --out runs/demo
  pathopeft wsi process --manifest data_manifests/slides.csv --out runs/x --mpp 0.5 --tile-px 224 \\
      --backbone vit_small_patch16_224 --weights encoder.safetensors --workers 8
  pathopeft wsi process --manifest slides.csv --out runs/x --shard $SLURM_ARRAY_TASK_ID/16   # job array
  pathopeft wsi process --manifest slides.csv --out runs/x --devices 4 --num-nodes 2          # Lightning DDP
Rerunning the same command resumes: finished slides are skipped, failed ones are retried.
"""


def _add_wsi_job_args(p: argparse.ArgumentParser, features: bool) -> None:
    src = p.add_argument_group("input (one of)")
    src.add_argument("--manifest", type=Path, help="CSV with slide_id,path[,mpp][,label][,task]")
    src.add_argument("--slides", nargs="+", type=Path, help="slide files (slide_id = file name stem)")
    src.add_argument(
        "--sample", action="store_true", help="the bundled demo: CMU-1-Small-Region.svs (CC0), fetched once"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created; rerun to resume)")
    p.add_argument("--config", type=Path, help="YAML with 'tiling:' / 'extract:' sections (flags override it)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=float, help="target µm/px of the tiles (default 0.5)")
    res.add_argument("--mag", type=float, help="target magnification, converted as 10/mag µm/px")
    p.add_argument("--slide-mpp", type=float, help="level-0 µm/px for --slides that lack it in their metadata")
    t = p.add_argument_group("tiling")
    t.add_argument("--tile-px", type=int, help="tile side in pixels at the target resolution (default 224)")
    t.add_argument(
        "--overlap-px", type=int, help="overlap between neighbouring tiles, pixels at the target (default 0)"
    )
    t.add_argument("--min-tissue", type=float, help="minimum tissue fraction per tile, 0..1 (default 0.25)")
    t.add_argument("--tissue-threshold", type=int, help="fixed HSV-saturation threshold 0..255 (default: Otsu)")
    t.add_argument(
        "--tissue-geojson",
        type=Path,
        help="folder of <slide_id>.geojson tissue outlines (QuPath export, TRIDENT contours_geojson/) used as the mask",
    )
    if features:
        e = p.add_argument_group("features")
        e.add_argument(
            "--encoder",
            "--backbone",
            dest="backbone",
            help="a published pathology encoder (uni_v1, virchow2, hoptimus1, phikon, resnet50, …: weights from "
            "--weights or the local HF cache, never random) or a timm architecture name",
        )
        e.add_argument(
            "--weights",
            help="local weights file; a timm name without it is RANDOM-INIT, an encoder name reads the HF cache",
        )
        e.add_argument(
            "--backbone-kwargs", type=json.loads, help="JSON kwargs for timm.create_model, e.g. '{\"img_size\": 256}'"
        )
        e.add_argument("--adapter", help="PEFT adapter folder to merge into the backbone before extraction")
        e.add_argument("--batch-size", type=int, help="tiles per forward pass (default 64)")
        e.add_argument("--workers", type=int, help="DataLoader worker processes reading tile batches (default 2)")
        e.add_argument("--read-threads", type=int, help="decoder threads per reading process (default 1)")
        e.add_argument("--device", help="cuda | cuda:1 | cpu (default: cuda if available)")
        e.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="autocast on CUDA (default auto)")
        e.add_argument(
            "--skip-bad-tiles",
            action="store_true",
            default=None,
            help="drop undecodable tiles instead of failing the slide",
        )
    s = p.add_argument_group("scale-out")
    s.add_argument("--shard", help="i/n: process every n-th slide starting at i (0-based), for job arrays")
    s.add_argument("--devices", help="devices per node for Lightning DDP (e.g. 4); default: this process only")
    s.add_argument("--num-nodes", type=int, default=1, help="nodes for Lightning DDP (default 1)")
    s.add_argument("--accelerator", default="auto", help="Lightning accelerator for --devices (gpu | cpu | auto)")
    p.add_argument("--no-qc", action="store_true", help="skip the per-slide QC pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results made with other parameters in --out (default: refuse, naming what differs)",
    )


def _build_batch_config(args: argparse.Namespace, features: bool) -> Any:
    """The YAML (``--config``) with the flags on top, typed and checked by :func:`pathopeft.wsi.config.load_batch_config`.

    Paths in the YAML are relative to it; paths given as flags, and ``--out``, to the working directory.
    """
    from pathopeft.wsi.config import load_batch_config, parse_shard
    from pathopeft.wsi.resolution import mag_to_mpp

    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        raise UserError(f"invalid WSI settings: {e}") from None
    flags: dict[str, Any] = {
        "out_dir": str(args.out), "shard": shard, "qc": False if args.no_qc else None,
        "progress": False if args.no_progress else None, "overwrite": args.overwrite or None,
        "tiling.target_mpp": mag_to_mpp(args.mag) if args.mag is not None else args.mpp,
        "tiling.tile_px": args.tile_px, "tiling.overlap_px": args.overlap_px,
        "tiling.min_tissue_fraction": args.min_tissue, "tiling.tissue_params.threshold": args.tissue_threshold,
    }  # fmt: skip
    if args.tissue_geojson is not None:  # outlines drawn in QuPath (or TRIDENT's contours) instead of detection
        if args.tissue_threshold is not None:
            raise UserError("--tissue-geojson and --tissue-threshold exclude each other (the outlines are the mask)")
        flags.update({"tiling.tissue": "geojson", "tiling.tissue_params.folder": str(args.tissue_geojson.resolve())})
        flags.pop("tiling.tissue_params.threshold")
    if features:
        names = {"backbone": "backbone", "weights": "weights", "backbone_kwargs": "backbone_kwargs",
                 "adapter": "adapter", "batch_size": "batch_size", "workers": "num_workers", "read_threads": "read_threads", "device": "device",
                 "precision": "precision", "skip_bad_tiles": "skip_bad_tiles"}  # fmt: skip
        flags.update({f"extract.{key}": getattr(args, flag) for flag, key in names.items()})
    cfg = load_batch_config(args.config, flags)  # None values are "not given": the YAML's or the default stays
    if not features or str(cfg.extract.backbone).lower() == "none":
        cfg.extract.backbone = None  # tiling only
    return cfg


def _entries(args: argparse.Namespace) -> list:
    from pathopeft.wsi.config import ManifestError, entries_from_paths, read_manifest

    given = [x for x in (args.manifest, args.slides, args.sample or None) if x]
    if len(given) != 1:
        raise UserError("give exactly one input: --manifest CSV, --slides FILE..., or --sample")
    try:
        if args.manifest:
            return read_manifest(args.manifest)
        if args.slides:
            return entries_from_paths(args.slides, mpp=args.slide_mpp)
    except ManifestError as e:
        raise UserError(str(e)) from None
    from pathopeft.data import SampleDataError, sample_slide

    try:
        return entries_from_paths([sample_slide()])
    except SampleDataError as e:
        raise UserError(str(e)) from None


def cmd_wsi_job(args: argparse.Namespace, features: bool) -> int:
    from pathopeft.wsi.batch import run_batch

    cfg = _build_batch_config(args, features)
    entries = _entries(args)
    if args.devices:
        from pathopeft.wsi.distributed import run_distributed

        devices = int(args.devices) if str(args.devices).isdigit() else args.devices
        run_distributed(entries, cfg, accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes)
        from pathopeft.wsi.qc import load_records

        records = load_records(Path(cfg.out_dir), [e.slide_id for e in entries])
    else:
        records = run_batch(entries, cfg)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("status", "pending")] = counts.get(r.get("status", "pending"), 0) + 1
    done_tiles = sum(r.get("n_tiles", 0) for r in records if r.get("status") == "done")
    print(
        f"{len(records)} slides processed now: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; {done_tiles} tiles. Summary: {Path(cfg.out_dir) / 'summary.md'}"
    )  # fmt: skip
    return 1 if counts.get("failed") else 0


def cmd_wsi_info(args: argparse.Namespace) -> int:
    from pathopeft.wsi.slide import SlideError, open_slide

    try:
        slide = open_slide(args.slide, mpp=args.slide_mpp)
    except SlideError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with slide:
        info = slide.mpp_info
        out = {
            "path": str(slide.path),
            "backend": slide.backend,
            "vendor": slide.properties.get("openslide.vendor"),
            "dimensions": slide.dimensions,
            "levels": [
                {"dimensions": d, "downsample": round(ds, 4)}
                for d, ds in zip(slide.level_dimensions, slide.level_downsamples, strict=False)
            ],
            "mpp": info.mpp,
            "mpp_source": info.source,
            "mpp_rejected": info.rejected,
        }
    print(json.dumps(out, indent=2))
    return 0


def cmd_wsi_qc(args: argparse.Namespace) -> int:
    from pathopeft.wsi.qc import write_summary

    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir}: no such folder", file=sys.stderr)
        return 2
    if not (args.run_dir / "status").is_dir():
        print(f"error: {args.run_dir}: not a pathopeft WSI run folder (no status/ inside)", file=sys.stderr)
        return 2
    print(write_summary(args.run_dir))
    return 0


def cmd_wsi_export(args: argparse.Namespace) -> int:
    from pathopeft.wsi.export import export_run

    report = export_run(args.run_dir, args.out, args.to)
    for folder, slides in report.slides.items():
        print(f"{folder}: {len(slides)} slides exported for {args.to.upper()} into {report.out_dir}")
    for slide, reason in report.failed.items():
        print(f"error: {slide}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def add_commands(sub: Any) -> None:
    """Register this group's sub-commands on the top-level sub-parsers."""
    wsi = sub.add_parser("wsi", help="whole-slide images: tissue, tiles, features").add_subparsers(
        dest="cmd", required=True
    )
    fmt = argparse.RawDescriptionHelpFormatter
    p = wsi.add_parser(
        "process", help="slides → tissue → tiles → features (HDF5 per slide)", epilog=WSI_EPILOG, formatter_class=fmt
    )
    _add_wsi_job_args(p, features=True)
    p.set_defaults(func=lambda a: cmd_wsi_job(a, features=True))
    p = wsi.add_parser("tile", help="slides → tissue → tile coordinates only", epilog=WSI_EPILOG, formatter_class=fmt)
    _add_wsi_job_args(p, features=False)
    p.set_defaults(func=lambda a: cmd_wsi_job(a, features=False))
    p = wsi.add_parser("info", help="levels, mpp (and its source) of one slide")
    p.add_argument("slide", type=Path)
    p.add_argument("--slide-mpp", type=float, help="fallback level-0 µm/px")
    p.set_defaults(func=cmd_wsi_info)
    p = wsi.add_parser("export", help="a run folder in the layout CLAM or TRIDENT reads (hard links, .pt files)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--to", required=True, choices=["clam", "trident"])
    p.add_argument("--out", required=True, type=Path, help="destination folder (CLAM's or TRIDENT's job folder)")
    p.set_defaults(func=cmd_wsi_export)
    p = wsi.add_parser("qc", help="rebuild summary.md and failures.csv of a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_wsi_qc)
