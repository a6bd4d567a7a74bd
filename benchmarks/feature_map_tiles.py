"""λ-orthogonal feature maps on real H&E tiles (issue 17): do old features stay usable after the encoder adapts?

The old encoder is the capricorn DenseNet-121 (the features every bag here was built from). The new encoder is
the same network after a LoRA (rank 8, every conv but the stem) was fine-tuned on tile classification of the
two-organ classes and merged in, i.e. what a user's features look like after they adapt their encoder. On tiles
both encoders see, :func:`pathopeft.mil.feature_map.fit_feature_map` fits new → old for several λ; on held-out
tiles (other groups) the table reports the relative error ‖new T + b − old‖² / ‖old − mean‖², ‖TᵀT − I‖, and
whether a linear probe trained on OLD features still works when fed the new features (unmapped, or mapped).

Usage::

    python benchmarks/feature_map_tiles.py --per-class 60 --eval-per-class 30 --steps 40
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pathopeft import adapters
from pathopeft.backbones import load_weights
from pathopeft.datasets.two_organ import CLASSES, default_weights, stream_splits
from pathopeft.mil.feature_map import fit_feature_map, orthogonality_error, procrustes


def _images(tiles) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(t.path).convert("RGB"), dtype=np.float32) / 255.0)
                        .permute(2, 0, 1) for t in tiles])  # fmt: skip


@torch.no_grad()
def features(model, tiles, batch: int = 16) -> torch.Tensor:
    model.eval()
    return torch.cat([model(_images(tiles[i : i + batch])) for i in range(0, len(tiles), batch)])


def probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    """A linear classifier on standardised-by-train features (full-batch Adam)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        opt.step()
    return lin


def main(argv: list[str] | None = None) -> int:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch-data", type=Path, default=ROOT.parent / "shared" / "patch_data")
    p.add_argument("--per-class", type=int, default=60, help="training tiles per class (fine-tune and fit)")
    p.add_argument("--eval-per-class", type=int, default=30, help="held-out tiles per class (test split)")
    p.add_argument("--steps", type=int, default=40, help="LoRA fine-tuning steps (batch 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    splits = stream_splits(args.patch_data, seed=args.seed)

    def pick(split: str, n: int):
        out = []
        for c in CLASSES:
            pool = [t for t in splits[split] if t.label == c]
            out += rng.sample(pool, min(n, len(pool)))
        return out

    fit_tiles, eval_tiles = pick("train", args.per_class), pick("test", args.eval_per_class)
    y_fit = torch.tensor([CLASSES.index(t.label) for t in fit_tiles])
    y_eval = torch.tensor([CLASSES.index(t.label) for t in eval_tiles])

    def encoder():
        m = timm.create_model("densenet121", pretrained=False, num_classes=0)
        load_weights(m, default_weights(args.patch_data))
        return m

    old = encoder()
    f_old, e_old = features(old, fit_tiles), features(old, eval_tiles)
    # the new encoder: a LoRA fine-tuned on the fit tiles' classes, merged in
    torch.manual_seed(args.seed)
    model = adapters.create("lora", encoder(), rank=8, targets="all-conv")
    head = torch.nn.Linear(1024, len(CLASSES))
    params = [q for q in model.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    for _ in range(args.steps):
        idx = rng.sample(range(len(fit_tiles)), min(16, len(fit_tiles)))
        opt.zero_grad()
        F.cross_entropy(head(model(_images([fit_tiles[i] for i in idx]))), y_fit[idx]).backward()
        opt.step()
    new = model.merge_and_unload()
    f_new, e_new = features(new, fit_tiles), features(new, eval_tiles)
    mu, sd = f_old.mean(0), f_old.std(0) + 1e-6
    lin = probe((f_old - mu) / sd, y_fit)

    def probe_acc(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((lin((x - mu) / sd).argmax(1) == y_eval).float().mean())

    spread = float((e_old - e_old.mean(0)).pow(2).sum())
    shift = float((e_new - e_old).pow(2).sum()) / spread
    print(f"{len(fit_tiles)} fit tiles, {len(eval_tiles)} held-out tiles ({len(CLASSES)} classes); LoRA rank 8 "
          f"fine-tuned {args.steps} steps; feature shift ‖new − old‖² / spread = {shift:.3f}; "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("\n| map | held-out rel. error | ‖TᵀT − I‖ | old-feature probe on it |\n|---|---:|---:|---:|")
    print(f"| old features (reference) | 0 | — | {probe_acc(e_old):.3f} |")
    print(f"| new features, no map | {shift:.3f} | — | {probe_acc(e_new):.3f} |")
    for lam in (0.0, 1e-1, 10.0, float("inf")):
        t, b = procrustes(f_new, f_old) if lam == float("inf") else fit_feature_map(f_new, f_old, lam, max_iter=100)
        mapped = e_new @ t + b
        err = float((mapped - e_old).pow(2).sum()) / spread
        print(f"| λ = {lam:g} | {err:.3f} | {orthogonality_error(t):.3f} | {probe_acc(mapped):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
