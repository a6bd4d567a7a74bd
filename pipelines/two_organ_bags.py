"""Build the two-organ (lung, then oral cavity) MIL bags for CoMEL's per-organ continual protocol.

Task ``lung`` = LC25000 lung_n vs lung_scc, task ``oral`` = Rahman oral_normal vs oral_scc; classes
[lung_normal, lung_scc, oral_normal, oral_scc] (labels offset by 2·task). Features: real DenseNet-121
(capricorn weights, mean 0 / std 1) by default; the colour nearest-centroid baseline is printed beside the
summary because a MIL result means little without the trivial baseline. Examples::

    python pipelines/two_organ_bags.py --out runs/two_organ_bags                    # DenseNet-121, 4×4 bags
    python pipelines/two_organ_bags.py --out runs/two_organ_colour --features colour
    python pipelines/two_organ_bags.py --out runs/three_task_bags --with-lung-aca    # + lung adenocarcinoma
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

from pathopeft.datasets.lc25000 import BagSpec
from pathopeft.datasets.lc25000.summary import print_build_report
from pathopeft.datasets.two_organ import DEFAULT_SPEC, DENSENET, build_two_organ_bags

DEFAULT_ROOT = REPO.parent / "shared" / "patch_data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="patch_data folder (lc25000_lung224/, oral_rahman224/)"
    )
    p.add_argument("--out", type=Path, default=REPO / "runs" / "two_organ_bags", help="output folder")
    p.add_argument("--features", default=DENSENET, help=f"'{DENSENET}' (default, capricorn weights) or 'colour'")
    p.add_argument("--weights", default=None, help="weights file (default: ../weights/capricorn_densenet121/...)")
    p.add_argument(
        "--grid", type=int, default=DEFAULT_SPEC.grid, help=f"bag = grid×grid tiles (default {DEFAULT_SPEC.grid})"
    )
    p.add_argument(
        "--bags-per-class",
        type=int,
        nargs=3,
        default=list(DEFAULT_SPEC.bags_per_class),  # type: ignore[arg-type]
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"bags per (task, class) in each split (default {' '.join(map(str, DEFAULT_SPEC.bags_per_class))})",  # type: ignore[arg-type]
    )
    p.add_argument("--hard", action="store_true", help="witness rate 1–5%% instead of 5–30%%")
    p.add_argument(
        "--with-lung-aca", action="store_true", help="add the third task: lung adenocarcinoma vs benign lung"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="device for timm features (default cpu)")
    p.add_argument("--no-baseline", action="store_true", help="skip the colour baseline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make = BagSpec.hard if args.hard else BagSpec
    spec = make(grid=args.grid, bags_per_class=tuple(args.bags_per_class), fractions=DEFAULT_SPEC.fractions)
    t0 = time.perf_counter()
    manifest = build_two_organ_bags(
        args.root,
        args.out,
        spec,
        args.features,
        args.seed,
        weights=args.weights,
        batch_size=args.batch_size,
        device=args.device,
        with_lung_aca=args.with_lung_aca,
    )
    print_build_report(manifest, spec, args.features, time.perf_counter() - t0, baseline=not args.no_baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
