"""What a bag-building pipeline prints when it is done: the bag counts per cell and the colour baseline.

Why here: every bag set built by :func:`~pathopeft.datasets.lc25000.build_bags` (LC25000, the two-organ
stream) records its tasks in ``bags.json``, so one summary serves every stream's pipeline script.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from pathopeft.datasets.lc25000.bags import BagSpec
from pathopeft.datasets.lc25000.baseline import colour_centroid_baseline
from pathopeft.datasets.lc25000.build import EXTRA_COLUMNS, read_stream
from pathopeft.datasets.lc25000.tiles import SPLITS
from pathopeft.mil.data import read_bag_manifest


def summary_table(manifest: str | os.PathLike[str]) -> str:
    """Bags per (task, split, label) and their mean witness rate, as aligned text."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in read_bag_manifest(manifest, extra_columns=EXTRA_COLUMNS):
        cells[(r.task, r.split, r.label)].append(float(r.extra["witness_rate"]))
    _, tasks = read_stream(manifest)
    w = max([5] + [len(lab) for t in tasks for lab in (t.normal, t.tumour)])
    lines = [f"{'task':<5} {'split':<6} {'label':<{w}} {'bags':>5} {'witness':>8}"]
    for task in tasks:
        for split in SPLITS:
            for label in (task.normal, task.tumour):
                rates = cells.get((task.task, split, label), [])
                mean = sum(rates) / len(rates) if rates else float("nan")
                lines.append(f"{task.task:<5} {split:<6} {label:<{w}} {len(rates):>5} {mean:>8.3f}")
    return "\n".join(lines)


def print_build_report(manifest: Path, spec: BagSpec, features: str, build_s: float, baseline: bool = True) -> None:
    """The manifest path and build settings, :func:`summary_table`, and (unless ``baseline`` is False) the
    colour nearest-centroid baseline: a MIL result on these bags means little without it."""
    print(f"\n{manifest}  ({features}, grid {spec.grid}×{spec.grid}, witness {spec.witness_range}, {build_s:.1f} s)")
    print(summary_table(manifest))
    if baseline:
        t0 = time.perf_counter()
        base = colour_centroid_baseline(manifest)
        print(f"\ncolour nearest-centroid baseline (test split; {time.perf_counter() - t0:.1f} s)")
        for key, value in base.items():
            print(f"  {key:<20} {value:.4f}")
