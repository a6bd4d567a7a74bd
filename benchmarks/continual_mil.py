"""CoMEL against the continual baselines on real H&E bags (issue 4), with the trivial colour baseline beside it.

Builds (once, cached) LC25000 lung bags with known tile labels — ``pathopeft.datasets.lc25000.build_bags``: k×k
grids of real tiles, split by near-duplicate group, a contiguous tumour blob in positive bags — then runs
every strategy of ``pathopeft.mil.strategies`` on the task sequence aca-vs-benign → scc-vs-benign with the
same seed and prints one table per setting: average accuracy, forgetting, backward transfer, final instance
AUC, train time and peak memory; and the colour-histogram nearest-centroid baseline.

Usage::

    python benchmarks/continual_mil.py                           # colour features, both settings (~15 min CPU)
    python benchmarks/continual_mil.py --features timm:vit_tiny_patch16_224 --settings class
    python benchmarks/continual_mil.py --hard                    # 1–5 % witness rate
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from pathopeft.datasets.lc25000 import BagSpec, build_bags, colour_centroid_baseline
from pathopeft.mil.config import ContinualConfig, load_config
from pathopeft.mil.continual import compare
from pathopeft.mil.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "patch_data" / "lc25000_lung224")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_continual_mil")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "mil" / "comel_lc25000.yaml")
    p.add_argument("--features", default="colour", help="colour | timm:<arch> (random init unless --weights)")
    p.add_argument("--bags-per-class", type=int, default=50)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--hard", action="store_true", help="1–5 %% witness rate instead of 5–30 %%")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES.names(ablation=False))
    p.add_argument("--settings", nargs="+", default=["class", "task"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found: the LC25000 tiles live in ../shared (see its README)")
    t0 = time.perf_counter()
    spec = (
        BagSpec.hard(bags_per_class=args.bags_per_class, grid=args.grid)
        if args.hard
        else BagSpec(bags_per_class=args.bags_per_class, grid=args.grid)
    )
    tag = f"{args.features.replace(':', '_')}-g{args.grid}-n{args.bags_per_class}{'-hard' if args.hard else ''}"
    manifest = build_bags(args.data, args.work / "bags" / tag, spec, features=args.features, seed=args.seed)
    baseline = colour_centroid_baseline(manifest, data_root=args.data)
    lines = [
        (
            f"Data: LC25000 lung bags `{tag}` (seed {args.seed}), features `{args.features}`; torch {torch.__version__}, "
            f"{platform.machine()}, {os.cpu_count()} CPU threads, load average "
            f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}."
        ),
        "",
        "Trivial colour baseline (nearest centroid on colour histograms, no MIL, no continual learning): "
        + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items() if isinstance(v, float)),
    ]
    for setting in args.settings:
        cfg = load_config(args.config, manifest=str(manifest), out_dir=str(args.work / "runs" / tag), setting=setting,
                          seed=args.seed, epochs=args.epochs)  # fmt: skip
        cfg = ContinualConfig(**asdict(cfg))
        report = compare(cfg, args.strategies)
        lines += ["", f"### {setting}-incremental, model `{cfg.model}`, {cfg.epochs} epochs per task", "",
                  report.to_markdown()]  # fmt: skip
        print(f"{setting} done after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines.append(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
