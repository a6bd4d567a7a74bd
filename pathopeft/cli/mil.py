"""``pathopeft mil run|compare|federated|unlearn|heatmap``: continual, federated MIL and unlearning from a YAML."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _mil_config(args: argparse.Namespace):
    """The run's ContinualConfig: the YAML plus the command-line overrides (a bad key or value: ConfigError)."""
    from pathopeft.mil.config import load_config

    return load_config(
        args.config, strategy=getattr(args, "strategy", None), setting=args.setting, out_dir=args.out_dir,
        epochs=args.epochs, seed=args.seed, manifest=args.manifest,
    )  # fmt: skip


def cmd_mil_run(args: argparse.Namespace) -> int:
    from pathopeft.mil.continual import run_continual

    cfg = _mil_config(args)  # a bad config is a ConfigError: one line from pathopeft.cli.main
    state = run_continual(cfg)
    print((Path(cfg.out_dir) / f"{cfg.strategy}-{cfg.setting}" / "results.md").read_text())
    return 0 if state["done"] else 1


def cmd_mil_compare(args: argparse.Namespace) -> int:
    from pathopeft.mil.continual import compare

    cfg = _mil_config(args)  # a bad config is a ConfigError: one line from pathopeft.cli.main
    print(compare(cfg, args.strategies).to_markdown())
    return 0


#: Input paths of a ``seg fit`` YAML (dotted keys), resolved against the YAML before LightningCLI reads it: jsonargparse
#: resolves config-relative paths only for ``Path``-typed arguments, and these are ``str``.


def cmd_mil_federated(args: argparse.Namespace) -> int:
    """FedSVD / FedAvg-LoRA on Flower, or the centralised baseline, from a YAML (``pathopeft.mil.federated``)."""
    from pathopeft.config import load_config
    from pathopeft.mil.federated import FederatedConfig, run_federated

    overrides = {"method": args.method, "out_dir": args.out_dir, "rounds": args.rounds, "seed": args.seed,
                 "noise_multiplier": args.noise_multiplier}  # fmt: skip
    cfg = load_config(FederatedConfig, args.config, overrides, ("manifest", "init"))
    result = run_federated(cfg)
    accs = ", ".join(f"{h['test_acc']:.3f}" for h in result["history"])
    dp = f"; DP-SGD (ε = {result['dp']['epsilon']:.2f}, δ = {cfg.delta:g})" if "dp" in result else ""
    print(
        f"{cfg.method}: {len(result['clients'])} clients {result['clients']} bags{dp}; test accuracy by round: {accs}"
    )
    return 0


def cmd_mil_unlearn(args: argparse.Namespace) -> int:
    """LoKU unlearning of a class or a site's cohort from a trained MIL net (``pathopeft.mil.unlearn``)."""
    from pathopeft.config import load_config
    from pathopeft.errors import UserError
    from pathopeft.mil.unlearn import UnlearnConfig, run_unlearn

    overrides = {"forget": args.forget, "forget_site": args.forget_site, "out_dir": args.out_dir, "init": args.init,
                 "steps": args.steps, "seed": args.seed}  # fmt: skip
    if args.forget or args.forget_site:  # one on the command line replaces the YAML's choice
        overrides.update(forget=args.forget or "", forget_site=args.forget_site or "")
    cfg = load_config(UnlearnConfig, args.config, overrides, ("manifest", "init"))
    try:
        r = run_unlearn(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    what = cfg.forget if cfg.forget is not None else f"site {cfg.forget_site}"
    print(f"unlearned {what} in {r['steps']} steps: test accuracy on it {r['test_forget_acc']['before']:.3f} -> "
          f"{r['test_forget_acc']['after']:.3f} (chance {r['chance']:.3f}); retained "
          f"{r['test_retain_acc']['before']:.3f} -> {r['test_retain_acc']['after']:.3f}; {cfg.out_dir}")  # fmt: skip
    return 0


def cmd_mil_heatmap(args: argparse.Namespace) -> int:
    """Per-slide QuPath GeoJSON (and PNG) of a finished run's ``tile_scores.h5``."""
    import sys

    import h5py

    from pathopeft.mil.plots import plot_instance_heatmap
    from pathopeft.mil.qupath import tile_scores_geojson

    scores_h5 = args.run_dir / "tile_scores.h5"
    if not scores_h5.is_file():
        print(f"error: {scores_h5}: not found (is {args.run_dir} a finished `pathopeft mil run`?)", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "heatmaps"
    with h5py.File(scores_h5, "r") as f:
        slides = args.slides or list(f)
        unknown = [s for s in slides if s not in f]
        if unknown:
            print(f"error: {scores_h5}: no slide(s) {unknown}", file=sys.stderr)
            return 2
        for sid in slides:
            g = f[sid]
            coords, scores = g["coords"][:], g["scores"][:]
            labels = g["instance_labels"][:] if "instance_labels" in g else None
            size = float(g.attrs.get("tile_size_l0", 0) or args.tile_size_l0 or 0)
            if size <= 0:
                print(f"error: {scores_h5}: {sid} has no tile_size_l0; pass --tile-size-l0", file=sys.stderr)
                return 2
            tile_scores_geojson(coords, scores, size, out / f"{sid}.geojson", labels=labels)
            if args.png:
                plot_instance_heatmap(coords, scores, size, out / f"{sid}.png", labels=labels, title=sid)
    print(f"{len(slides)} slides: QuPath GeoJSON{' and PNG' if args.png else ''} in {out}")
    return 0


def add_commands(sub: Any) -> None:
    """Register this group's sub-commands on the top-level sub-parsers."""
    from pathopeft.mil.strategies import STRATEGIES  # cheap: strategy modules import torch inside their hooks

    mil = sub.add_parser("mil", help="continual multiple-instance learning (CoMEL) on feature bags").add_subparsers(
        dest="cmd", required=True
    )
    for name, helptext in (
        ("run", "train one strategy task after task (resumes after a crash)"),
        ("compare", "run several strategies on the same data and seed; one report"),
    ):
        p = mil.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True, help="YAML of ContinualConfig fields (configs/mil/)")
        p.add_argument("--manifest", help="bag manifest CSV (slide_id,path,label,task,split)")
        p.add_argument("--out-dir", help="output folder")
        p.add_argument("--setting", choices=["class", "task"], help="class- or task-incremental")
        p.add_argument("--epochs", type=int)
        p.add_argument("--seed", type=int)
        if name == "run":
            p.add_argument("--strategy", help=f"continual strategy: {' | '.join(STRATEGIES.names())}")
            p.set_defaults(func=cmd_mil_run)
        else:
            p.add_argument(
                "--strategies", nargs="+", default=STRATEGIES.names(ablation=False),
                help=f"strategies to compare (default: all but the ablations; known: {', '.join(STRATEGIES.names())})",
            )  # fmt: skip
            p.set_defaults(func=cmd_mil_compare)
    p = mil.add_parser("federated", help="multi-hospital LoRA training on Flower: fedsvd | fedavg | central")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--method", choices=["fedsvd", "fedavg", "central"])
    p.add_argument("--out-dir")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--noise-multiplier", type=float, help="DP-SGD on the clients with Opacus (privacy unit: a bag)")
    p.set_defaults(func=cmd_mil_federated)
    p = mil.add_parser("unlearn", help="forget a class or a site's cohort with LoKU (IHL + FILA LoRA)")
    p.add_argument("--config", type=Path, required=True, help="YAML of UnlearnConfig fields (configs/mil/)")
    p.add_argument("--forget", help="the class to forget (replaces the YAML's forget / forget_site)")
    p.add_argument("--forget-site", help="the manifest site whose bags to forget")
    p.add_argument("--init", help="the trained net's .safetensors (e.g. a run's task_<t>/net.safetensors)")
    p.add_argument("--out-dir")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_mil_unlearn)
    p = mil.add_parser("heatmap", help="tile scores of a finished run as QuPath GeoJSON (File › Import objects) + PNG")
    p.add_argument("run_dir", type=Path, help="a `pathopeft mil run` output folder (with tile_scores.h5)")
    p.add_argument("--slides", nargs="+", help="slide ids (default: every scored test slide)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/heatmaps)")
    p.add_argument("--png", action="store_true", help="also a PNG per slide (tiles coloured by score)")
    p.add_argument("--tile-size-l0", type=float, help="tile side in level-0 px, for runs older than the attribute")
    p.set_defaults(func=cmd_mil_heatmap)
