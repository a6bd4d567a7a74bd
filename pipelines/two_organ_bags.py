"""Build the two-organ (lung, then oral cavity) MIL bags for CoMEL's per-organ continual protocol.

Task ``lung`` = LC25000 lung_n vs lung_scc, task ``oral`` = Rahman oral_normal vs oral_scc; classes
[lung_normal, lung_scc, oral_normal, oral_scc] (labels offset by 2·task). Features: real DenseNet-121
(capricorn weights, mean 0 / std 1) by default; the colour nearest-centroid baseline is printed beside the
summary because a MIL result means little without the trivial baseline. Examples::

    python pipelines/two_organ_bags.py --out runs/two_organ_bags                    # DenseNet-121, 4×4 bags
    python pipelines/two_organ_bags.py --out runs/two_organ_colour --features colour
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from pathopeft.datasets.lc25000 import EXTRA_COLUMNS, SPLITS, BagSpec, colour_centroid_baseline
from pathopeft.datasets.two_organ import DEFAULT_SPEC, DENSENET, TASKS, build_two_organ_bags
from pathopeft.mil.data import read_bag_manifest

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="device for timm features (default cpu)")
    p.add_argument("--no-baseline", action="store_true", help="skip the colour baseline")
    return p.parse_args(argv)


def summary_table(manifest: Path) -> str:
    """Bags per (task, split, label) and their mean witness rate, as aligned text."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in read_bag_manifest(manifest, extra_columns=EXTRA_COLUMNS):
        cells[(r.task, r.split, r.label)].append(float(r.extra["witness_rate"]))
    lines = [f"{'task':<5} {'split':<6} {'label':<12} {'bags':>5} {'witness':>8}"]
    for task in TASKS:
        for split in SPLITS:
            for label in (task.normal, task.tumour):
                rates = cells.get((task.task, split, label), [])
                mean = sum(rates) / len(rates) if rates else float("nan")
                lines.append(f"{task.task:<5} {split:<6} {label:<12} {len(rates):>5} {mean:>8.3f}")
    return "\n".join(lines)


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
    )
    build_s = time.perf_counter() - t0
    print(
        f"\n{manifest}  ({args.features}, grid {spec.grid}×{spec.grid}, witness {spec.witness_range}, {build_s:.1f} s)"
    )
    print(summary_table(manifest))
    if not args.no_baseline:
        t0 = time.perf_counter()
        base = colour_centroid_baseline(manifest)
        print(f"\ncolour nearest-centroid baseline (test split; {time.perf_counter() - t0:.1f} s)")
        for key, value in base.items():
            print(f"  {key:<20} {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
