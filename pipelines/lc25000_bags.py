"""Build the LC25000-lung MIL bags for continual MIL (CoMEL) and print their summary and the colour baseline.

The baseline is printed on purpose: on LC25000, stain colour alone nearly solves tumour vs benign, so a MIL
result on these bags means little without it. Examples::

    python pipelines/lc25000_bags.py --out runs/lc25000_bags                       # colour features, 8×8 bags
    python pipelines/lc25000_bags.py --out runs/lc25000_vit --features timm:vit_tiny_patch16_224
    python pipelines/lc25000_bags.py --out runs/lc25000_hard --hard                # 1–5 % witnesses
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from pathopeft.datasets.lc25000 import BagSpec, build_bags
from pathopeft.datasets.lc25000.summary import print_build_report

DEFAULT_ROOT = REPO.parent / "shared" / "patch_data" / "lc25000_lung224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="lc25000_lung224 folder (manifest.csv, images/)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lc25000_bags", help="output folder")
    p.add_argument("--features", default="colour", help="'colour' or 'timm:<arch>' (default: colour)")
    p.add_argument("--weights", default=None, help="local weights file for timm features (default: random init)")
    p.add_argument("--grid", type=int, default=8, help="bag = grid×grid tiles (1..16, default 8)")
    p.add_argument("--bags-per-class", type=int, default=50, help="bags per (task, class, split) (default 50)")
    p.add_argument("--hard", action="store_true", help="witness rate 1–5%% instead of 5–30%%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="device for timm features (default cpu)")
    p.add_argument("--no-baseline", action="store_true", help="skip the colour baseline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make = BagSpec.hard if args.hard else BagSpec
    spec = make(grid=args.grid, bags_per_class=args.bags_per_class)
    if args.features.startswith("timm:") and args.weights is None:
        print(f"!!! {args.features} with RANDOM weights: features are a lower bound, not a pathology encoder !!!")
    t0 = time.perf_counter()
    manifest = build_bags(
        args.root,
        args.out,
        spec,
        args.features,
        args.seed,
        weights=args.weights,
        batch_size=args.batch_size,
        device=args.device,
    )
    print_build_report(manifest, spec, args.features, time.perf_counter() - t0, baseline=not args.no_baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
