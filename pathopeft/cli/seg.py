"""``pathopeft seg fit|predict|compare``: segmentation fine-tuning (``fit`` is LightningCLI throughout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathopeft.errors import UserError

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


def add_commands(sub: Any) -> None:
    """Register this group's sub-commands on the top-level sub-parsers."""
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
