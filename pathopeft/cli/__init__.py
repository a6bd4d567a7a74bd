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
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pathopeft.cli import mil, seg, tools, wsi
from pathopeft.cli.wsi import _build_batch_config  # noqa: F401 - the WSI settings builder, used by tests
from pathopeft.errors import UserError


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
    """The whole command tree; each group (``pathopeft.cli.<group>``) adds its own sub-commands."""
    from pathopeft import __version__

    parser = _Parser(prog="pathopeft", description="Computational pathology toolkit (WSI processing, MIL, PEFT).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"pathopeft {__version__}")
    sub = parser.add_subparsers(dest="group", required=True)
    for group in (wsi, mil, seg, tools):
        group.add_commands(sub)
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
