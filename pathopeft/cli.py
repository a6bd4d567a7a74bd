"""The one ``pathopeft`` command.

    pathopeft wsi process   slides → tissue → tiles → features (HDF5 per slide), resumable
    pathopeft wsi tile      same without features
    pathopeft wsi info      what a slide reports: levels, mpp and where it came from
    pathopeft wsi qc        rebuild summary.md / failures.csv of a run folder
    pathopeft mil run|compare   continual MIL (CoMEL and baselines) on feature bags
    pathopeft seg fit|predict|compare   segmentation fine-tuning with adapters
    pathopeft adapters …    list methods, count trainable parameters, inspect an adapter folder
    pathopeft data sample   fetch the CC0 demo slide into the cache
    pathopeft doctor        versions, OpenSlide library, CUDA

Every command is a thin layer over a library function (``pathopeft.wsi.run_batch`` …), so notebooks and
tests call the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathopeft.errors import UserError

log = logging.getLogger("pathopeft")

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
    if features:
        e = p.add_argument_group("features")
        e.add_argument("--backbone", help="timm architecture name (default vit_small_patch16_224)")
        e.add_argument("--weights", help="local .safetensors/.pth weights; without it features are RANDOM-INIT")
        e.add_argument(
            "--backbone-kwargs", type=json.loads, help="JSON kwargs for timm.create_model, e.g. '{\"img_size\": 256}'"
        )
        e.add_argument("--adapter", help="PEFT adapter folder to merge into the backbone before extraction")
        e.add_argument("--batch-size", type=int, help="tiles per forward pass (default 64)")
        e.add_argument("--workers", type=int, help="DataLoader workers decoding tiles (default 2)")
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
    import yaml

    from pathopeft.wsi.config import BatchConfig, ExtractConfig, TilingConfig, parse_shard
    from pathopeft.wsi.resolution import mag_to_mpp

    base: dict[str, Any] = {}
    if args.config:
        if not args.config.is_file():
            raise UserError(f"{args.config}: config not found")
        try:
            base = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{args.config}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(base, dict):
            raise UserError(f"{args.config}: expected a mapping with tiling/extract/qc sections")
        unknown = set(base) - {"tiling", "extract", "qc"}
        if unknown:
            raise UserError(f"{args.config}: unknown section(s) {sorted(unknown)}; expected tiling/extract/qc")
    tiling = dict(base.get("tiling") or {})
    extract = dict(base.get("extract") or {})
    if args.mpp is not None:
        tiling["target_mpp"] = args.mpp
    if args.mag is not None:
        tiling["target_mpp"] = mag_to_mpp(args.mag)
    for flag, key in [("tile_px", "tile_px"), ("overlap_px", "overlap_px"), ("min_tissue", "min_tissue_fraction")]:
        if getattr(args, flag) is not None:
            tiling[key] = getattr(args, flag)
    if args.tissue_threshold is not None:
        tiling.setdefault("tissue_params", {})["threshold"] = args.tissue_threshold
    if features:
        flags = {"backbone": "backbone", "weights": "weights", "backbone_kwargs": "backbone_kwargs", "adapter": "adapter",
                 "batch_size": "batch_size", "workers": "num_workers", "device": "device", "precision": "precision",
                 "skip_bad_tiles": "skip_bad_tiles"}  # fmt: skip
        for flag, key in flags.items():
            if getattr(args, flag) is not None:
                extract[key] = getattr(args, flag)
        if str(extract.get("backbone", "")).lower() == "none":
            extract["backbone"] = None
    else:
        extract["backbone"] = None
    try:
        return BatchConfig(
            out_dir=str(args.out),
            tiling=TilingConfig(**tiling),
            extract=ExtractConfig(**extract),
            shard=parse_shard(args.shard) if args.shard else (0, 1),
            qc=not args.no_qc and base.get("qc", True),
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid WSI settings: {e}") from None


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


def cmd_data_sample(args: argparse.Namespace) -> int:
    from pathopeft.data import SampleDataError, sample_slide

    try:
        print(sample_slide(args.cache_dir))
    except SampleDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from pathopeft import __version__

    lines = [f"pathopeft {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    lines.append(
        f"cuda available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
    )
    for mod in ("timm", "lightning", "monai", "peft", "h5py", "skimage", "albumentations", "tifffile"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError as e:
            lines.append(f"{mod} MISSING ({e})")
    try:
        import openslide

        lines.append(f"openslide-python {openslide.__version__}, OpenSlide library {openslide.__library_version__}")
    except Exception as e:  # noqa: BLE001 - report any failure of the C library, never crash doctor
        lines.append(f"openslide MISSING ({e})")
    print("\n".join(lines))
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from pathopeft.adapters.registry import _OURS, PEFT_LORA_FAMILY

    for name, m in _OURS.items():
        doc = (m.config_cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} pathopeft  {doc}")
    for name in PEFT_LORA_FAMILY:
        print(f"{name:8s} peft       LoRA family from PEFT (use_dora / init_lora_weights='pissa')")
    print("other PEFT methods by their PEFT name (waveft, miss, randlora, vera, ia3, …) with their own keywords")
    return 0


def cmd_adapters_count(args: argparse.Namespace) -> int:
    """Trainable parameters of a method on a timm architecture (random init, nothing downloaded)."""
    import timm

    from pathopeft import adapters

    try:
        model = timm.create_model(args.model, pretrained=False, **(args.model_kwargs or {}))
    except (RuntimeError, TypeError) as e:  # timm: "Unknown model (...)"; a bad keyword
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    total = sum(p.numel() for p in model.parameters())
    extra = args.method_kwargs or {}
    try:
        wrapped = adapters.create(args.method, model, rank=args.rank, targets=args.targets, **extra)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    n_layers = len(adapters.resolve_targets(model, args.targets))
    print(
        f"{args.method} rank {args.rank} on {args.model} ({args.targets}: {n_layers} layers): "
        f"{trainable:,} trainable of {total:,} base parameters ({100 * trainable / total:.3f} %)"
    )
    return 0


def cmd_adapters_info(args: argparse.Namespace) -> int:
    from pathopeft.adapters.core import adapter_config_path, read_json

    print(json.dumps(read_json(adapter_config_path(args.adapter_dir)), indent=2))  # AdapterLoadError names the file
    base = args.adapter_dir / "pathopeft_base.json"
    if base.is_file():
        print(json.dumps(read_json(base), indent=2))
    return 0


def _mil_config(args: argparse.Namespace):
    from pathopeft.mil.continual import load_config

    return load_config(
        args.config, strategy=getattr(args, "strategy", None), setting=args.setting, out_dir=args.out_dir,
        epochs=args.epochs, seed=args.seed, manifest=args.manifest,
    )  # fmt: skip


def cmd_mil_run(args: argparse.Namespace) -> int:
    from pathopeft.mil.continual import run_continual

    try:
        cfg = _mil_config(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = run_continual(cfg)
    print((Path(cfg.out_dir) / f"{cfg.strategy}-{cfg.setting}" / "results.md").read_text())
    return 0 if state["done"] else 1


def cmd_mil_compare(args: argparse.Namespace) -> int:
    from pathopeft.mil.continual import compare

    try:
        cfg = _mil_config(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare(cfg, args.strategies).to_markdown())
    return 0


def cmd_seg_fit(args: argparse.Namespace) -> int:
    """LightningCLI over SegModule + SegDataModule: the YAML holds model, data and trainer sections.

    The config is checked first, and LightningCLI raises its parse errors instead of printing its usage text, so
    a bad config is one ``error:`` line; data errors (``SegDataModule.setup`` checks every file) pass through.
    """
    from lightning.pytorch.cli import LightningCLI

    from pathopeft.seg.compare import SegConfigError, read_config
    from pathopeft.seg.data import SegDataModule
    from pathopeft.seg.module import SegModule

    read_config(args.config)
    try:
        LightningCLI(
            SegModule, SegDataModule, args=["fit", "--config", str(args.config), *args.rest],
            save_config_kwargs={"overwrite": True}, seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
        )  # fmt: skip
    except argparse.ArgumentError as e:  # jsonargparse: unknown key, wrong type, missing required value
        raise SegConfigError(f"{args.config}: {' '.join(str(e).split())}") from None
    return 0


def cmd_seg_predict(args: argparse.Namespace) -> int:
    from pathopeft.seg.module import load_checkpoint
    from pathopeft.seg.predict import check_images, predict_files

    check_images(args.images)  # a missing image fails before the checkpoint is loaded or anything is written
    module = load_checkpoint(args.ckpt, map_location="cpu")
    for p in predict_files(module.model, args.images, args.out, args.crop):
        print(p)
    return 0


def cmd_seg_compare(args: argparse.Namespace) -> int:
    from pathopeft.seg.compare import CompareConfig, read_config, run_compare

    data = read_config(args.config)
    if args.out_dir:
        data["out_dir"] = str(args.out_dir)
    try:
        cfg = CompareConfig(**data)
    except TypeError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    run_compare(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathopeft", description="Computational pathology toolkit (WSI processing, MIL, PEFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", required=True)

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
    p = wsi.add_parser("qc", help="rebuild summary.md and failures.csv of a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_wsi_qc)

    data = sub.add_parser("data", help="sample data").add_subparsers(dest="cmd", required=True)
    p = data.add_parser("sample", help="download CMU-1-Small-Region.svs (CC0) into the cache and print its path")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_data_sample)

    mil = sub.add_parser("mil", help="continual multiple-instance learning (CoMEL) on feature bags").add_subparsers(
        dest="cmd", required=True
    )
    for name, helptext in (
        ("run", "train one strategy task after task (resumes after a crash)"),
        ("compare", "run several strategies on the same data and seed; one report"),
    ):
        p = mil.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True, help="YAML of ContinualConfig fields (configs/mil/)")
        p.add_argument("--manifest", help="bag manifest CSV (slide_id,path,label,task,split)")
        p.add_argument("--out-dir", help="output folder")
        p.add_argument("--setting", choices=["class", "task"], help="class- or task-incremental")
        p.add_argument("--epochs", type=int)
        p.add_argument("--seed", type=int)
        if name == "run":
            p.add_argument("--strategy", help="comel | owlora | lora | finetune | ewc | replay | joint")
            p.set_defaults(func=cmd_mil_run)
        else:
            p.add_argument(
                "--strategies", nargs="+", default=["comel", "lora", "finetune", "ewc", "replay", "joint"],
                help="strategies to compare",
            )  # fmt: skip
            p.set_defaults(func=cmd_mil_compare)

    seg = sub.add_parser("seg", help="segmentation fine-tuning with adapters").add_subparsers(
        dest="cmd", required=True
    )
    p = seg.add_parser("fit", help="train one model (LightningCLI: model/data/trainer sections in the YAML)")
    p.add_argument("--config", type=Path, required=True, help="configs/seg/<name>.yaml")
    p.set_defaults(rest=[])  # any further --section.key value pairs go to LightningCLI, e.g. --trainer.max_epochs 5
    p.set_defaults(func=cmd_seg_fit)
    p = seg.add_parser("predict", help="full-size masks and overlays for images, from a checkpoint")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint of seg fit (adapter + decoder only)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--crop", type=int, default=256, help="tile size the model was trained at")
    p.add_argument("images", nargs="+", type=Path)
    p.set_defaults(func=cmd_seg_predict)
    p = seg.add_parser("compare", help="several adapters × a learning-rate sweep × seeds on one dataset; a report")
    p.add_argument("--config", type=Path, required=True, help="configs/seg/compare_*.yaml (CompareConfig fields)")
    p.add_argument("--out-dir", type=Path)
    p.set_defaults(func=cmd_seg_compare)

    ad = sub.add_parser("adapters", help="parameter-efficient adapters: list, count, inspect").add_subparsers(
        dest="cmd", required=True
    )
    p = ad.add_parser("list", help="registered methods (ours and PEFT's)")
    p.set_defaults(func=cmd_adapters_list)
    p = ad.add_parser("count", help="trainable parameters of a method on a timm model (random init)")
    p.add_argument("method", help="salt | wara | snella | lora | dora | pissa | any PEFT method name")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm architecture")
    p.add_argument("--model-kwargs", type=json.loads, help="JSON kwargs for timm.create_model")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn", help="attn | attn+mlp | all-linear | all-conv | all | regex")
    p.add_argument("--method-kwargs", type=json.loads, help="JSON config keywords, e.g. '{\"r_lora\": 4}'")
    p.set_defaults(func=cmd_adapters_count)
    p = ad.add_parser("info", help="print an adapter folder's config and base-model fingerprint")
    p.add_argument("adapter_dir", type=Path)
    p.set_defaults(func=cmd_adapters_info)

    p = sub.add_parser("doctor", help="report versions and hardware")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pathopeft`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "func", None) is not cmd_seg_fit:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # bad input: one line naming the file and the problem, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
