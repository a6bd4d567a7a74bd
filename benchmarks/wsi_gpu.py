"""WSI extraction throughput against the bare model, in the same run: does the slide reader keep the GPU fed?

On a generated JPEG pyramid (H&E-like discs, 0.25 µm/px, Aperio-like downsamples 1/4/16/64: a 40×-like scan, so
a 0.5 µm/px target reads level 0 and shrinks it 2×, in the JPEG decoder), this prints one Markdown table:

* **bare model**: :meth:`pathopeft.backbones.Backbone.embed` on random uint8 tiles already on the device
  (bf16 autocast on CUDA) — the ceiling;
* **extract_features** with W DataLoader worker processes × T decoder threads each — the whole path (decode,
  shrink, pin, transfer, embed);
* their ratio (1.0 = the reader is never the bottleneck).

Usage::

    python benchmarks/wsi_gpu.py --device cuda --model vit_base_patch16_224      # what benchmarks/gpu.sh runs
    python benchmarks/wsi_gpu.py --device cpu --model vit_tiny_patch16_224 --size 2048 --workers 0 2   # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pathopeft.backbones import create_backbone
from pathopeft.wsi.extract import extract_features
from pathopeft.wsi.pyramid import write_pyramid
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tiling import tile_grid
from pathopeft.wsi.tissue import detect_tissue


def synthetic_slide(folder: Path, size: int, seed: int = 0) -> Path:
    """A size×size H&E-like image (pink discs with nuclei-like speckle on white) as a 4-level JPEG pyramid."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, dtype=np.uint8)
    yy, xx = np.ogrid[:size, :size]
    for _ in range(6):
        r0, c0, rad = rng.integers(0, size), rng.integers(0, size), rng.integers(size // 8, size // 3)
        disc = (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2
        img[disc] = (205, 120, 175)
    speckle = rng.random((size, size)) < 0.02
    img[speckle] = (80, 40, 130)
    return write_pyramid(
        img, folder / "synthetic.tiff", mpp=0.25, tile=256, compression="jpeg", downsamples=(1, 4, 16, 64)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_tiles_per_s(bb, device: torch.device, batch: int, tile_px: int, precision: str, seconds: float) -> float:
    x = torch.randint(0, 256, (batch, 3, tile_px, tile_px), dtype=torch.uint8, device=device)
    for _ in range(3):
        bb.embed(x, precision)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        bb.embed(x, precision)
        n += batch
    _sync(device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (random init)")
    p.add_argument("--size", type=int, default=12288, help="level-0 side of the synthetic slide in px")
    p.add_argument("--mpp", type=float, default=0.5, help="target µm/px")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--configs",
        nargs="+",
        default=["0:1", "0:8", "0:15", "4:3", "8:2"],
        help="workers:read_threads pairs to measure",
    )
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the bare-model measurement")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        slide_path = synthetic_slide(Path(tmp), args.size)
        with open_slide(slide_path) as s:
            mask = detect_tissue(s)
            grid = tile_grid(s.dimensions, s.level_downsamples, s.mpp, args.mpp, args.tile_px, tissue=mask)
        setup_s = time.perf_counter() - t0
        bb = create_backbone(args.model)
        bb.model.to(device).eval()
        bare = bare_tiles_per_s(bb, device, args.batch_size, args.tile_px, args.precision, args.seconds)
        rows = []
        for spec in args.configs:
            w, t = (int(v) for v in spec.split(":"))
            _sync(device)
            t1 = time.perf_counter()
            feats, _ = extract_features(
                slide_path, grid, bb, args.batch_size, w, device, args.precision, read_threads=t
            )
            _sync(device)
            rate = len(feats) / (time.perf_counter() - t1)
            rows.append((f"{w} × {t}", rate))
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    lines = [
        (
            f"WSI extraction vs bare model — {args.model} (random init), {args.precision} on {gpu}, batch "
            f"{args.batch_size}, {len(grid)} tiles of {args.tile_px} px at {args.mpp} µm/px from a {args.size}² "
            f"synthetic JPEG pyramid (level {grid.choice.level} read, ×{grid.choice.resize_factor:g} resize); "
            f"slide + tissue + grid {setup_s:.1f} s."
        ),
        "",
        "| path | workers × threads | tiles/s | × bare model |",
        "|---|---:|---:|---:|",
        f"| bare model (`Backbone.embed` on device tensors) | – | {bare:.0f} | 1.00 |",
        *(f"| `extract_features` | {w} | {r:.0f} | {r / bare:.2f} |" for w, r in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
