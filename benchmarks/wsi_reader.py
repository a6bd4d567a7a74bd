"""WSI reader throughput (issue 13): the tile-direct reader against OpenSlide paths and the JPEG decode limit.

On a realistic generated slide (a 30720² BigTIFF at 0.25 µm/px built from the real CMU-1 and TCGA pixels on
near-white noisy glass, Aperio-like downsamples 1/4/16/64, 256-px YCbCr JPEG tiles at quality 80, so a
0.5 µm/px tile means reading 448 level-0 px and shrinking 2×) and on the real test slides, one run measures,
in interleaved rounds (best of N; every pass opens the slide afresh, cold caches):

* tissue detection: today's OpenCV detector at 8 µm/px versus the scikit-image recipe it replaced (4 µm/px);
* read + decode tiles/s into uint8 batches: the CLAM-style loader (``Whole_Slide_Bag_FP``'s recipe through a
  DataLoader, as in issue 13's numbers), a bare OpenSlide ``read_region`` loop, pathopeft's previous path
  (OpenSlide region by region, PIL bilinear), and the tile-direct reader at 1 and 2 decoder threads;
* the JPEG decode limit on the same core: every distinct slide tile the grid touches decoded once by
  libjpeg-turbo (full size and DCT-½), expressed as output tiles/s;
* the pixel difference of the new tiles from the previous path's (and from an area filter).

Peers (CLAM, TRIDENT, tiatoolbox, LazySlide, cuCIM) need their own scratch environment and are not run here
yet. Usage::

    python benchmarks/wsi_reader.py                       # builds runs/bench_wsi/mosaic.tiff once (~1 min)
    python benchmarks/wsi_reader.py --tiles 512 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile

from pathopeft.wsi import h5io
from pathopeft.wsi.extract import TileBatches
from pathopeft.wsi.slide import OpenSlideSlide, open_slide, read_at_mpp
from pathopeft.wsi.tiff_direct import DirectTiffSlide
from pathopeft.wsi.tiling import TileGrid, tile_grid
from pathopeft.wsi.tissue import OtsuTissueDetector, detect_tissue

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared"))
SOURCES = ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the realistic slide ------------------------------------------------------------------------------------
def build_mosaic(path: Path, side: int = 30720, pieces: int = 36, seed: int = 0) -> Path:
    """Real tissue pieces (random flips) scattered on glass, written as an Aperio-like JPEG pyramid."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    srcs = []
    for name in SOURCES:
        with open_slide(SHARED / "test_slides" / name, mpp=0.25) as s:
            srcs.append(s.read_region((0, 0), 0, s.dimensions))
    log(f"building {path} ({side}² px) …")
    glass = np.clip(rng.normal(238, 2, (512, 512, 3)), 0, 255).astype(np.uint8)  # tiled: no 20 GB float array
    image = np.tile(glass, (side // 512 + 1, side // 512 + 1, 1))[:side, :side].copy()
    cells = int(np.ceil(np.sqrt(pieces)))
    cell = side // cells
    for k in range(pieces):
        piece = srcs[k % len(srcs)]
        if rng.random() < 0.5:
            piece = piece[::-1]
        if rng.random() < 0.5:
            piece = piece[:, ::-1]
        ph, pw = min(piece.shape[0], cell), min(piece.shape[1], cell)
        cy, cx = divmod(k, cells)
        y = cy * cell + int(rng.integers(0, cell - ph + 1))
        x = cx * cell + int(rng.integers(0, cell - pw + 1))
        image[y : y + ph, x : x + pw] = piece[:ph, :pw]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    res = (1e4 / 0.25, 1e4 / 0.25)
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = image
        for ds in (1, 4, 16, 64):
            if ds > 1:
                level = cv2.resize(image, (side // ds, side // ds), interpolation=cv2.INTER_AREA)
            tw.write(level, tile=(256, 256), compression="jpeg", compressionargs={"level": 80}, photometric="ycbcr", subsampling=(2, 2),
                     resolution=(res[0] / ds, res[1] / ds), resolutionunit="CENTIMETER",
                     subfiletype=0 if ds == 1 else 1)  # fmt: skip
    tmp.rename(path)
    return path


# --- loaders --------------------------------------------------------------------------------------------------
def read_naive(path: Path, grid: TileGrid) -> np.ndarray:
    """CLAM-style: OpenSlide region → convert("RGB") → PIL bilinear, tile by tile."""
    import openslide
    from PIL import Image

    wsi = openslide.OpenSlide(str(path))
    out = np.empty((len(grid.coords), grid.tile_px, grid.tile_px, 3), np.uint8)
    for k, (x, y) in enumerate(grid.coords):
        img = wsi.read_region((int(x), int(y)), grid.choice.level, (grid.read_px, grid.read_px)).convert("RGB")
        if grid.read_px != grid.tile_px:
            img = img.resize((grid.tile_px, grid.tile_px), Image.BILINEAR)
        out[k] = np.asarray(img)
    wsi.close()
    return out


def read_clam_bag(path: Path, h5_path: Path, batch: int = 64) -> int:
    """CLAM's ``Whole_Slide_Bag_FP`` recipe through a DataLoader (coords H5 reopened per item, OpenSlide region,
    ``convert("RGB")``, PIL resize, default collate): the "CLAM-style loader" of issue 13's measurements."""
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).parent))
    from wsi_throughput import NaiveClamBag

    return sum(len(b[0]) for b in DataLoader(NaiveClamBag(h5_path, path), batch_size=batch, num_workers=0))


def read_batches(
    path: Path, grid: TileGrid, reader: str, threads: int = 1, batch: int = 64, keep: bool = False
) -> list:
    """pathopeft's TileBatches with a chosen reader (``openslide``: the previous path; ``tiff-direct``)."""
    ds = TileBatches(path, grid, batch_size=batch, read_threads=threads)
    ds._slide = OpenSlideSlide(path) if reader == "openslide" else DirectTiffSlide(path, threads=threads)
    ds._owner = os.getpid()
    batches = []
    for b in range(len(ds)):  # what extraction gets: one uint8 tensor per batch, released after the model
        tiles = ds[b][0]
        if keep:
            batches.append(tiles)
    ds._slide.close()
    return batches


def decode_limit(path: Path, grid: TileGrid, scale: int) -> tuple[float, float]:
    """(JPEG tiles/s, distinct slide tiles per output tile) decoding each touched tile once."""
    from pathopeft.wsi.tiff_direct import _decode_jpeg

    slide = DirectTiffSlide(path)
    lv = slide._levels[grid.choice.level]
    ds = slide.level_downsamples[grid.choice.level]
    touched = sorted(
        {i for x, y in grid.coords for i in slide._tiles_for(grid.choice.level, round(x / ds), round(y / ds), grid.read_px, grid.read_px)}
    )  # fmt: skip
    raw = [slide._raw(lv, i) for i in touched]
    t0 = time.perf_counter()
    for data in raw:
        _decode_jpeg(data, lv.tables, lv.rgb_jpeg, scale)
    dt = time.perf_counter() - t0
    slide.close()
    return len(raw) / dt, len(touched) / len(grid.coords)


# --- tissue ---------------------------------------------------------------------------------------------------
def tissue_new(path: Path) -> float:
    with open_slide(path) as s:
        t0 = time.perf_counter()
        detect_tissue(s)
        return time.perf_counter() - t0


def tissue_old(path: Path) -> float:
    """The scikit-image recipe at 4 µm/px on an OpenSlide read, as pathopeft did before issue 13."""
    from skimage import color, filters, morphology  # imported before timing (it was lazily inside before)

    d = OtsuTissueDetector(mpp=4.0)
    s = OpenSlideSlide(path)
    t0 = time.perf_counter()
    img, ds = read_at_mpp(s, 4.0)
    mpp = s.mpp * ds
    sat = (color.rgb2hsv(img)[..., 1] * 255).astype(np.uint8)
    sat = filters.median(sat, morphology.disk(round(d.median_um / mpp / 2)))
    mask = sat > max(filters.threshold_otsu(sat), d.min_saturation)
    mask = morphology.closing(mask, morphology.disk(round(d.closing_um / mpp / 2)))
    mask = morphology.remove_small_objects(mask, max_size=int(d.min_tissue_area_um2 / mpp**2) - 1)
    morphology.remove_small_holes(mask, max_size=int(d.max_hole_area_um2 / mpp**2) - 1)
    s.close()
    return time.perf_counter() - t0


# --- the run --------------------------------------------------------------------------------------------------
def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def slide_case(path: Path, mpp: float | None, n_tiles: int, tile_px: int, target_mpp: float) -> TileGrid:
    with open_slide(path, mpp=mpp) as s:
        tissue = detect_tissue(s)
        grid = tile_grid(s.dimensions, s.level_downsamples, s.mpp, target_mpp, tile_px, 0, tissue, 0.25)
    rng = np.random.default_rng(0)
    if len(grid.coords) > n_tiles:  # a contiguous run of the row-major grid, as a batch job reads it
        start = int(rng.integers(0, len(grid.coords) - n_tiles))
        keep = slice(start, start + n_tiles)
        grid = dataclasses.replace(grid, coords=grid.coords[keep], tissue_fraction=grid.tissue_fraction[keep])
    return grid


def run(path: Path, label: str, mpp: float | None, args: argparse.Namespace) -> list[str]:
    grid = slide_case(path, mpp, args.tiles, args.tile_px, args.target_mpp)
    n = len(grid.coords)
    log(f"{label}: {n} tiles, level {grid.choice.level}, read {grid.read_px} → {grid.tile_px} px")
    h5_path = ROOT / "runs" / "bench_wsi" / f"{path.stem}_coords.h5"
    with open_slide(path, mpp=mpp) as s:
        h5io.write_patches(h5_path, grid.coords, h5io.coords_attrs(grid, path.stem, s.level_dimensions), {})
    loaders: dict[str, Callable[[], object]] = {
        "CLAM-style loader (Whole_Slide_Bag_FP recipe, DataLoader)": lambda: read_clam_bag(path, h5_path),
        "OpenSlide read_region loop (convert, PIL bilinear)": lambda: read_naive(path, grid),
        "pathopeft before (OpenSlide, per region)": lambda: read_batches(path, grid, "openslide"),
        "pathopeft tiff-direct, 1 thread": lambda: read_batches(path, grid, "tiff-direct", 1),
        "pathopeft tiff-direct, 2 threads": lambda: read_batches(path, grid, "tiff-direct", 2),
    }
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for r in range(args.rounds):  # interleaved: every loader once per round
        for name, fn in loaders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        log(f"  round {r + 1}: " + ", ".join(f"{n / t[-1]:.0f}" for t in times.values()))
    tps = {k: n / min(v) for k, v in times.items()}
    naive = tps["CLAM-style loader (Whole_Slide_Bag_FP recipe, DataLoader)"]
    rows = [f"| {k} | {v:.0f} | {n / statistics.median(times[k]):.0f} | {v / naive:.2f}× |" for k, v in tps.items()]
    d = DirectTiffSlide(path)
    jpeg = d._levels[grid.choice.level].jpeg
    d.close()
    limit_note = ""
    if jpeg:
        scale = DirectTiffSlide(path).decode_scale(grid.choice.level, grid.read_px, grid.tile_px)
        per_tile = decode_limit(path, grid, 1)[1]  # best of the rounds, as the loaders
        full = max(decode_limit(path, grid, 1)[0] for _ in range(args.rounds))
        scaled = max(decode_limit(path, grid, scale)[0] for _ in range(args.rounds)) if scale > 1 else full
        for name, rate in ((f"JPEG decode limit, full size ({per_tile:.2f} slide tiles per output tile)", full),
                           (f"JPEG decode limit, DCT-1/{scale}", scaled)):  # fmt: skip
            rows.append(f"| {name} | {rate / per_tile:.0f} | — | {rate / per_tile / naive:.2f}× |")
        direct = tps["pathopeft tiff-direct, 1 thread"]
        limit_note = (
            f"tiff-direct (1 thread) at {100 * direct / (scaled / per_tile):.0f} % of the DCT-scaled decode limit. "
        )
    new = np.concatenate([b.permute(0, 2, 3, 1).numpy() for b in read_batches(path, grid, "tiff-direct", keep=True)])
    old = np.concatenate([b.permute(0, 2, 3, 1).numpy() for b in read_batches(path, grid, "openslide", keep=True)])
    diff = np.abs(new.astype(int) - old)
    tissue = [best(lambda: tissue_new(path), args.rounds), best(lambda: tissue_old(path), args.rounds)]
    return [
        (
            f"### {label}: {n} tiles of {grid.tile_px} px at {args.target_mpp} µm/px (level {grid.choice.level}, "
            f"read {grid.read_px} px)"
        ),
        "",
        "| loader | tiles/s (best) | tiles/s (median) | × CLAM-style |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        (
            f"{limit_note}Pixels, tiff-direct vs pathopeft before: mean |Δ| {diff.mean():.2f}, p99 "
            f"{np.percentile(diff, 99):.0f}, max {diff.max()} grey levels. Tissue detection: {tissue[0] * 1e3:.0f} ms "
            f"(OpenCV, 8 µm/px, tiff-direct) vs {tissue[1] * 1e3:.0f} ms (scikit-image recipe, 4 µm/px, OpenSlide): "
            f"{tissue[1] / tissue[0]:.0f}×."
        ),
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mosaic", type=Path, default=ROOT / "runs" / "bench_wsi" / "mosaic.tiff")
    p.add_argument("--tiles", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--side", type=int, default=30720, help="mosaic side in px (smaller: a quick check)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    mosaic = build_mosaic(args.mosaic, side=args.side)
    out = [
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, tifffile "
            f"{tifffile.__version__}; load average at start {' / '.join(f'{v:.2f}' for v in os.getloadavg())}."
        ),
        "",
    ]
    out += run(mosaic, "mosaic 30720² (0.25 µm/px, JPEG 256 px, 1/4/16/64)", None, args)
    out += run(SHARED / "test_slides" / "CMU-1-Small-Region.svs", "CMU-1-Small-Region.svs (0.5 µm/px, Aperio JPEG 240 px)", None, args)  # fmt: skip
    out.append(f"Total {time.perf_counter() - t0:.0f} s; load average at the end "
               f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}.")  # fmt: skip
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
