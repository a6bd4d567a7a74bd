"""Slides + labels → WSI features → bag manifest → continual MIL, as one resumable command.

    python pipelines/slides_to_mil.py --config configs/pipelines/slides_to_mil.yaml [--out-dir runs/x]

Each stage is the library's own (``run_batch``, ``write_bag_manifest``, ``run_continual``) and resumes on a
rerun: finished slides and finished tasks are not redone. Outputs: ``<out_dir>/wsi/`` (the WSI run),
``<out_dir>/bags.csv`` (+ ``bags_left_out.csv``: slides without features, with the reason) and
``<out_dir>/mil/`` (the continual run: results, R matrix, heatmaps).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from pathopeft.config import ConfigError, load_config
from pathopeft.errors import UserError
from pathopeft.io import atomic_write_text
from pathopeft.mil.wsi_bags import write_bag_manifest
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, read_manifest, run_batch
from pathopeft.wsi.outputs import features_dirname


@dataclass
class SlidesToMilConfig:
    """The pipeline's YAML: the slide manifest, the WSI settings and the continual-MIL settings."""

    slides: str
    out_dir: str = "runs/slides_to_mil"
    tiling: TilingConfig = field(default_factory=TilingConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    mil: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


PATH_FIELDS = ("slides", "extract.weights", "extract.adapter")


def run(cfg: SlidesToMilConfig) -> dict[str, Any]:
    """Run the three stages; returns the continual runner's final state."""
    from pathopeft.mil.continual import ContinualConfig, run_continual

    if not cfg.extract.backbone:
        raise ConfigError("extract.backbone: the MIL stage needs features; set an encoder")
    out = Path(cfg.out_dir)
    wsi = BatchConfig(out_dir=str(out / "wsi"), tiling=cfg.tiling, extract=cfg.extract, progress=cfg.progress)
    run_batch(read_manifest(cfg.slides), wsi)
    bags, left_out = write_bag_manifest(
        cfg.slides, out / "wsi", features_dirname(cfg.extract.backbone), out / "bags.csv"
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["slide_id", "status", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(left_out)
    atomic_write_text(out / "bags_left_out.csv", buf.getvalue())
    for row in left_out:
        print(f"left out of the bags: {row['slide_id']} ({row['status']}: {row['reason']})", file=sys.stderr)
    try:
        mil = ContinualConfig(manifest=str(bags), out_dir=str(out / "mil"), **cfg.mil)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"mil: {e}") from None
    return run_continual(mil)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="configs/pipelines/slides_to_mil.yaml")
    p.add_argument("--out-dir", help="output folder (default: the YAML's out_dir)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(SlidesToMilConfig, args.config, {"out_dir": args.out_dir}, PATH_FIELDS)
        state = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = Path(cfg.out_dir) / "mil"
    for md in sorted(results.glob("*/results.md")):
        print(md.read_text())
    return 0 if state.get("done") else 1


if __name__ == "__main__":
    raise SystemExit(main())
