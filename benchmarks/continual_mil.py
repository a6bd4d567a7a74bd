"""CoMEL against the official baselines and joint training on real H&E bags, over seeds (issue 11).

Builds (once, cached) the bag set of the chosen stream, then, for every seed and setting, runs every strategy
of ``pathopeft.mil.strategies`` (ablations left out unless named) through :func:`pathopeft.mil.continual.
compare` and prints one table per setting with mean ± std over the seeds: average accuracy, forgetting,
backward transfer, bag AUC, tile AUC and tile accuracy at the Youden threshold (localization as CoMEL measures
it, read from the attention), train time and peak memory; and the trivial colour nearest-centroid baseline.

Streams:

* ``two_organ`` (default): CoMEL's per-organ protocol on real tiles — task ``lung`` (LC25000 lung_n vs
  lung_scc), task ``oral`` (oral mucosa normal vs OSCC), each task its own two classes (labels + 2·task);
  real DenseNet-121 features (:mod:`pathopeft.datasets.two_organ`); config ``configs/mil/comel_two_organ.yaml``.
* ``lc25000``: the earlier shared-benign LC25000 stream (aca, then scc), colour features by default.

Usage::

    python benchmarks/continual_mil.py                                    # two organs, 3 seeds, both settings
    python benchmarks/continual_mil.py --seeds 0 --settings class --epochs 3   # quick look
    python benchmarks/continual_mil.py --width 128 --epochs 5             # the CPU-sized table in RESULTS.md
    python benchmarks/continual_mil.py --bppl-all                          # baselines with BPPL, as official
    python benchmarks/continual_mil.py --stream lc25000 --features colour
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pathopeft.datasets.lc25000 import BagSpec, build_bags, colour_centroid_baseline
from pathopeft.mil.config import load_config
from pathopeft.mil.continual import compare
from pathopeft.mil.report import ContinualReport, seeds_markdown
from pathopeft.mil.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared"))
CONFIGS = {"two_organ": "comel_two_organ.yaml", "lc25000": "comel_lc25000.yaml"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", choices=sorted(CONFIGS), default="two_organ")
    p.add_argument("--patch-data", type=Path, default=SHARED / "patch_data")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_continual_mil")
    p.add_argument("--config", type=Path, help="default: configs/mil/<stream's config>")
    p.add_argument("--features", help="two_organ: timm:densenet121 (default) | colour; lc25000: colour (default)")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES.names(ablation=False))
    p.add_argument("--settings", nargs="+", default=["class", "task"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--model",
        help="MIL model instead of the config's (e.g. gdat-grid: is the grid-grouped variant worth keeping?); "
        "model_kwargs it does not take are dropped",
    )
    p.add_argument(
        "--width",
        type=int,
        help="GDAT hidden width (default: the config's, official 512); heads = width/64, attention units = width/2 "
        "(CPU-sized runs: 128)",
    )
    p.add_argument("--bppl-all", action="store_true", help="BPPL on for every strategy (official baselines)")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Path, str]:
    """The stream's bags (built once into ``--work``) and a one-line description of them."""
    if args.stream == "two_organ":
        from pathopeft.datasets.two_organ import DENSENET, build_two_organ_bags

        features = args.features or DENSENET
        out = args.work / "bags" / f"two_organ-{features.replace(':', '_')}"
        manifest = out / "bags.csv"
        if not manifest.is_file():
            build_two_organ_bags(args.patch_data, out, features=features)
        return manifest, f"two-organ stream (lung_n/lung_scc, oral normal/OSCC), features `{features}`"
    features = args.features or "colour"
    data = args.patch_data / "lc25000_lung224"
    spec = BagSpec(bags_per_class=50, grid=8)
    manifest = build_bags(data, args.work / "bags" / f"lc25000-{features.replace(':', '_')}", spec, features)
    return manifest, f"LC25000 lung stream (aca, then scc; shared benign), features `{features}`"


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.patch_data.is_dir():
        raise SystemExit(f"{args.patch_data} not found: the tiles live in ../shared/patch_data (see its README)")
    t0 = time.perf_counter()
    manifest, what = build(args)
    print(f"bags ready after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    baseline = colour_centroid_baseline(manifest, data_root=args.patch_data if args.stream == "two_organ" else None)
    config = args.config or ROOT / "configs" / "mil" / CONFIGS[args.stream]
    head = (
        f"Data: {what}; `{manifest.parent.name}`. Config `{_rel(config)}`"
        f"{', BPPL on for every strategy' if args.bppl_all else ''}; seeds {args.seeds}; torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPU threads, load average "
        f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())} at the start."
    )
    lines = [
        head,
        "",
        "Trivial colour baseline (nearest centroid on colour histograms; no MIL, no continual learning): "
        + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items() if isinstance(v, float) and "n_test" not in k),
    ]
    config = Path(config)
    base = load_config(config, manifest=str(manifest))
    model, model_kwargs = args.model or base.model, dict(base.model_kwargs)
    if args.width:
        model_kwargs.update(hidden_dim=args.width, heads=max(1, args.width // 64), attn_dim=args.width // 2)
    if args.model:
        import inspect

        from pathopeft.mil.models import MIL_MODELS

        takes = inspect.signature(MIL_MODELS.get(args.model).__init__).parameters
        dropped = sorted(k for k in model_kwargs if k not in takes)
        model_kwargs = {k: v for k, v in model_kwargs.items() if k in takes}
        print(f"model {args.model}: dropped model_kwargs {dropped}", file=sys.stderr)
    tag = manifest.parent.name + ("" if model == base.model else f"-{model}") + ("-bppl_all" if args.bppl_all else "")
    tag += f"-w{model_kwargs.get('hidden_dim', 'default')}-e{args.epochs or 'cfg'}"
    runs = args.work / "runs" / tag
    for setting in args.settings:
        reports: list[ContinualReport] = []
        for seed in args.seeds:
            cfg = load_config(
                config, manifest=str(manifest), out_dir=str(runs / f"seed{seed}"),
                setting=setting, seed=seed, epochs=args.epochs, use_bppl=True if args.bppl_all else None,
                model=model, model_kwargs=model_kwargs,
            )  # fmt: skip
            reports.append(compare(cfg, args.strategies))
            print(f"{setting} seed {seed} done after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        lines += [
            "",
            (
                f"### {setting}-incremental, model `{cfg.model}` (hidden {model_kwargs.get('hidden_dim')}), "
                f"{cfg.epochs} epochs per task, {len(args.seeds)} seeds"
            ),
            "",
            seeds_markdown(reports),
        ]
    lines.append(f"Total benchmark time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
