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
    if features:
        names = {"backbone": "backbone", "weights": "weights", "backbone_kwargs": "backbone_kwargs",
                 "adapter": "adapter", "batch_size": "batch_size", "workers": "num_workers", "device": "device",
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
    """Every entry of ``ADAPTERS`` with its backend and capabilities: the list is the registry, never typed here."""
    from pathopeft.adapters import ADAPTERS

    for name in ADAPTERS:
        entry = ADAPTERS.entry(name)
        caps = entry.caps
        callback = caps["callback"]
        notes = [f"callback {getattr(callback, '__name__', callback)}"] if callback is not None else []
        notes += ["needs data before each task"] if caps["needs_data"] else []
        notes += [] if caps["identity_at_init"] else ["not identity at init"]
        layers = "linear+conv" if caps["conv"] else "linear only"
        extra = f" [{'; '.join(notes)}]" if notes else ""
        print(f"{name:8s} {caps['backend']:10s} {layers:11s}  {entry.obj.summary}{extra}")
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
    from pathopeft.adapters.serialization import adapter_config_path, read_json

    print(json.dumps(read_json(adapter_config_path(args.adapter_dir)), indent=2))  # AdapterLoadError names the file
    base = args.adapter_dir / "pathopeft_base.json"
    if base.is_file():
        print(json.dumps(read_json(base), indent=2))
    return 0


def _mil_config(args: argparse.Namespace):
    """The run's ContinualConfig: the YAML plus the command-line overrides (a bad key or value: ConfigError)."""
    from pathopeft.mil.config import load_config

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


#: Input paths of a ``seg fit`` YAML (dotted keys), resolved against the YAML before LightningCLI reads it: jsonargparse
#: resolves config-relative paths only for ``Path``-typed arguments, and these are ``str``.
SEG_FIT_PATH_FIELDS = ("model.model.weights", "model.model.init_args.weights", "data.manifest", "ckpt_path")


def _seg_fit_args(rest: Sequence[str]) -> tuple[list[str], Path | None]:
    """LightningCLI's ``fit`` arguments and the last ``--config`` given (named in errors).

    Each config is checked first (a missing file or bad YAML is one line instead of LightningCLI's usage text) and
    is followed by its input paths resolved against its folder (``$VAR`` expanded), so flags after it still win.
    """
    from pathopeft.config import ConfigError, read_yaml, resolve_path

    out, config, i = ["fit"], None, 0
    while i < len(rest):
        token = rest[i]
        if token in ("-c", "--config") and i + 1 < len(rest):
            value, step = rest[i + 1], 2
        elif token.startswith("--config="):
            value, step = token.split("=", 1)[1], 1
        else:
            out.append(token)
            i += 1
            continue
        out += rest[i : i + step]
        i += step
        config = Path(value)
        data = read_yaml(config)
        for dotted in SEG_FIT_PATH_FIELDS:
            node: Any = data
            for key in dotted.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, str) and node:
                try:
                    out.append(f"--{dotted}={resolve_path(node, config.resolve().parent)}")
                except ConfigError as e:
                    raise ConfigError(f"{config}: {dotted}: {e}") from None
    return out, config


def _seg_cli_class() -> type:
    """LightningCLI that parses only its ``args``: ``sys.argv`` holds ``pathopeft seg fit …``, this CLI's arguments.

    LightningCLI warns on every run when both ``args`` and ``sys.argv`` have arguments, so ``sys.argv`` is emptied
    while it parses, and only then (DDP's launcher restarts ``sys.argv``, which must stay the real command).
    """
    from lightning.pytorch.cli import LightningCLI

    class SegFitCLI(LightningCLI):
        def setup_parser(self, add_subcommands: bool, main_kwargs: Any, subparser_kwargs: Any) -> None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            for name, sub in getattr(self, "_subcommand_parsers", {}).items():
                sub.prog = f"pathopeft seg {name}"  # jsonargparse writes "pathopeft seg [options] fit"

        def parse_arguments(self, parser: Any, args: Any) -> None:
            argv, sys.argv = sys.argv, sys.argv[:1]
            try:
                super().parse_arguments(parser, args)
            finally:
                sys.argv = argv

    return SegFitCLI


def cmd_seg_fit(args: argparse.Namespace) -> int:
    """LightningCLI ``fit`` over SegModule + SegDataModule: every argument after ``seg fit`` is LightningCLI's
    (``--help``, ``--config``, ``--print_config``, ``--ckpt_path``, ``--trainer.max_epochs 5`` …).

    Input paths in the YAML are relative to it (:data:`SEG_FIT_PATH_FIELDS`); LightningCLI raises its parse errors
    instead of printing its usage text, so a bad key or value is one ``error:`` line naming the config; data
    errors (``SegDataModule.setup`` checks every file) pass through.
    """
    from pathopeft.config import ConfigError
    from pathopeft.seg.data import SegDataModule
    from pathopeft.seg.module import SegModule

    rest = list(args.rest)
    if not any(t in ("-h", "--help", "-c", "--config") or t.startswith("--config=") for t in rest):
        raise UserError("seg fit: give --config configs/seg/<name>.yaml (pathopeft seg fit --help lists every option)")
    cli_args, config = _seg_fit_args(rest)
    try:
        _seg_cli_class()(
            SegModule, SegDataModule, args=cli_args, save_config_kwargs={"overwrite": True}, seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, "prog": "pathopeft seg"},
        )  # fmt: skip
    except argparse.ArgumentError as e:  # jsonargparse: unknown key, wrong type, missing required value
        raise ConfigError(f"{config or 'seg fit'}: {' '.join(str(e).split())}") from None
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
    from pathopeft.seg.compare import load_compare_config, run_compare

    cfg = load_compare_config(args.config, out_dir=args.out_dir)  # ConfigError (a UserError) names file and key
    run_compare(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports an unknown option with the usage of the sub-command it was given to.

    Plain argparse hands a sub-command's leftovers up to the top-level parser, whose usage says nothing about
    them. ``forward=True`` makes a sub-command that parses nothing itself: all its arguments land in ``rest``
    (``seg fit``, whose ``--help`` and options are LightningCLI's). Nested sub-parsers inherit this class.
    """

    def __init__(self, *args: Any, forward: bool = False, **kwargs: Any) -> None:
        if forward:
            kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self.forward = forward

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.forward:
            namespace = namespace if namespace is not None else argparse.Namespace()
            for key, value in self._defaults.items():
                setattr(namespace, key, value)
            namespace.rest = list(sys.argv[1:] if args is None else args)
            return namespace, []
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def build_parser() -> argparse.ArgumentParser:
    from pathopeft import __version__

    parser = _Parser(prog="pathopeft", description="Computational pathology toolkit (WSI processing, MIL, PEFT).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"pathopeft {__version__}")
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

    from pathopeft.mil.strategies import STRATEGIES  # cheap: strategy modules import torch inside their hooks

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
            p.add_argument("--strategy", help=f"continual strategy: {' | '.join(STRATEGIES.names())}")
            p.set_defaults(func=cmd_mil_run)
        else:
            p.add_argument(
                "--strategies", nargs="+", default=STRATEGIES.names(ablation=False),
                help=f"strategies to compare (default: all but the ablations; known: {', '.join(STRATEGIES.names())})",
            )  # fmt: skip
            p.set_defaults(func=cmd_mil_compare)

    seg = sub.add_parser("seg", help="segmentation fine-tuning with adapters").add_subparsers(
        dest="cmd", required=True
    )
    # every argument after "seg fit" is LightningCLI's: --help, --config, --trainer.max_epochs 5, --ckpt_path ...
    p = seg.add_parser(
        "fit", help="train one model (LightningCLI: model/data/trainer sections in the YAML; --help for all)",
        forward=True,
    )  # fmt: skip
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
    p.add_argument("method", help="a method of `pathopeft adapters list`, or any PEFT method name")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # what there is to run, rather than argparse's one line about a missing argument
        parser.print_help()
        return 2
    args = parser.parse_args(argv)  # an unknown option: the sub-command's usage and the error, exit 2
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
