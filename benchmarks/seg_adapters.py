"""Segmentation adapter comparison on real data (issue 5): each method at its best learning rate.

Runs :func:`pathopeft.seg.compare.run_compare` from a YAML (default: MoNuSeg with the capricorn DenseNet-121,
the only real pretrained encoder available offline) and prints the report: test Dice mean ± std over seeds,
IoU, trainable parameters, peak memory, seconds per step, the LR sweep, and a picture grid in the output folder.

Usage::

    python benchmarks/seg_adapters.py                                   # configs/seg/compare_monuseg_densenet.yaml
    python benchmarks/seg_adapters.py --config configs/seg/compare_monuseg_vit_random.yaml
    python benchmarks/seg_adapters.py --max-steps 60 --seeds 0          # quicker
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from pathopeft.seg.compare import load_compare_config, run_compare

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "seg" / "compare_monuseg_densenet.yaml")
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lrs", type=float, nargs="+")
    p.add_argument("--methods", nargs="+")
    args = p.parse_args(argv)
    cfg = load_compare_config(args.config, args.out_dir)  # inputs relative to the YAML, as `seg compare`
    for key in ("max_steps", "seeds", "lrs", "methods"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    t0 = time.perf_counter()
    run_compare(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"Total {time.perf_counter() - t0:.0f} s; load average at the end {load}; config {args.config.name}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
