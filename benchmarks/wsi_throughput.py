"""WSI stage throughput (issue 2): pathopeft's tile loader versus a naive CLAM-style loader, and end to end.

For CMU-1-Small-Region (a real one-level Aperio SVS) and a 4-level pyramid derived from it at run time, this
prints Markdown tables of

* setup costs: tissue detection, tile grid, writing the CLAM-style coords H5;
* tiles/s for reading + decoding + collating every tile through ``torch.utils.data.DataLoader`` with
  :class:`pathopeft.wsi.extract.TileBatches` (one batch per item, slide opened once per worker process) versus
  :class:`NaiveClamBag` (CLAM's ``Whole_Slide_Bag_FP`` recipe: slide handle opened in ``__init__`` in the
  parent, coords H5 reopened on every ``__getitem__``, one ``read_region(...).convert("RGB")`` per tile),
  both measured in the same run with the same batch size and 0/1/2 workers, repeats interleaved;
* end-to-end tiles/s of :func:`pathopeft.wsi.extract.extract_features` with a small randomly initialised timm
  ViT on the CPU, next to the bare model's tiles/s on random tensors of the same batch size.

Every timed pass builds a fresh dataset and DataLoader (fresh slide handles, cold OpenSlide tile cache,
worker start-up included), as one slide of a batch job would. The tables report the fastest pass (best of N:
the least disturbed by other load on the machine); the medians go to stderr.

Usage::

    python benchmarks/wsi_throughput.py              # full run (~3-4 min on 2 CPU cores)
    python benchmarks/wsi_throughput.py --quick      # fewer tiles and repeats
    python benchmarks/wsi_throughput.py --workers 0 2 --out /tmp/wsi_throughput.md

The real slide is looked up in ``$PATHOPEFT_SHARED/test_slides`` (default ``../shared`` beside the repo, as
in the tests) unless ``--slide`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pathopeft.backbones import create_backbone
from pathopeft.wsi import h5io
from pathopeft.wsi.extract import TileBatches, extract_features
from pathopeft.wsi.pyramid import write_pyramid
from pathopeft.wsi.slide import open_slide
from pathopeft.wsi.tiling import TileGrid, tile_grid
from pathopeft.wsi.tissue import detect_tissue

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared"))
DEFAULT_SLIDE = SHARED / "test_slides" / "CMU-1-Small-Region.svs"


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout is clean Markdown."""
    print(msg, file=sys.stderr, flush=True)


# --- the derived pyramid ------------------------------------------------------------------------------------
def make_pyramid(src_slide_path: Path, out_path: Path, levels: int = 4, compression: str = "jpeg") -> Path:
    """A tiled generic-TIFF pyramid of the source's level 0 (what the tests use too), mpp in resolution tags."""
    with open_slide(src_slide_path) as s:
        image = s.read_region((0, 0), 0, s.dimensions)
        mpp = s.mpp
    if mpp is None:
        raise SystemExit(f"{src_slide_path}: no mpp, cannot derive a pyramid with resolution tags")
    return write_pyramid(image, out_path, mpp, levels=levels, compression=compression)


# --- the naive CLAM-style baseline --------------------------------------------------------------------------
class NaiveClamBag(Dataset):
    """CLAM's ``Whole_Slide_Bag_FP``: slide opened in ``__init__``, coords H5 reopened for every item.

    ``__getitem__`` reopens the H5, reads ``coords[idx]`` and the ``patch_level``/``patch_size`` attributes,
    reads one region with OpenSlide, drops alpha with ``.convert("RGB")`` and, when the H5 asks for a
    different tile size (CLAM's ``custom_downsample``), resizes with PIL. No torchvision: ``np.array`` → torch.
    """

    def __init__(self, h5_path: str | os.PathLike[str], slide_path: str | os.PathLike[str]) -> None:
        import openslide

        self.h5_path = str(h5_path)
        self.wsi = openslide.OpenSlide(str(slide_path))  # crosses the fork into workers, as in CLAM
        with h5py.File(self.h5_path, "r") as f:
            self.length = len(f["coords"])
            self.target_size = int(f["coords"].attrs["target_patch_size"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        with h5py.File(self.h5_path, "r") as f:
            dset = f["coords"]
            coord = dset[idx]
            level = int(dset.attrs["patch_level"])
            size = int(dset.attrs["patch_size"])
        img = self.wsi.read_region((int(coord[0]), int(coord[1])), level, (size, size)).convert("RGB")
        if size != self.target_size:
            img = img.resize((self.target_size, self.target_size), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), idx


# --- measurement helpers ------------------------------------------------------------------------------------
def make_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """The DataLoader settings of :func:`extract_features` (CPU), used for both loaders."""
    batched = isinstance(dataset, TileBatches)  # already yields whole batches, as extract_features reads it
    return DataLoader(
        dataset,
        batch_size=None if batched else batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def time_pass(make_dataset: Callable[[], Dataset], batch_size: int, workers: int) -> tuple[float, int]:
    """Seconds to build the dataset and DataLoader and iterate every batch once; and the tile count."""
    t0 = time.perf_counter()
    loader = make_loader(make_dataset(), batch_size, workers)
    n = 0
    for batch in loader:
        n += len(batch[0])
    return time.perf_counter() - t0, n


def repeat_grid(grid: TileGrid, times: int) -> TileGrid:
    """The same grid with its coordinate list repeated ``times`` times (more tiles for stable timing)."""
    return dataclasses.replace(
        grid, coords=np.tile(grid.coords, (times, 1)), tissue_fraction=np.tile(grid.tissue_fraction, times)
    )


@dataclasses.dataclass
class Case:
    """One slide at one target resolution, ready for both loaders."""

    label: str
    slide_path: Path
    target_mpp: float
    base: TileGrid  # every in-bounds tile once
    grid: TileGrid  # ``base`` repeated ``repeats`` times
    repeats: int
    h5_path: Path
    setup: dict[str, float]


def prepare_case(label: str, slide_path: Path, target_mpp: float, tile_px: int, min_tiles: int, workdir: Path) -> Case:
    """Tissue mask, tile grid (every in-bounds tile), repeated to ``min_tiles``, and the naive loader's H5."""
    slide = open_slide(slide_path)
    t0 = time.perf_counter()
    tissue = detect_tissue(slide)
    t1 = time.perf_counter()
    grid = tile_grid(
        slide.dimensions, slide.level_downsamples, slide.mpp, target_mpp, tile_px, 0, tissue, min_tissue_fraction=0.0
    )
    t2 = time.perf_counter()
    if len(grid) == 0:
        raise SystemExit(f"{slide_path}: no {tile_px}px tile fits at {target_mpp} µm/px")
    repeats = max(1, math.ceil(min_tiles / len(grid)))
    big = repeat_grid(grid, repeats)
    h5_path = workdir / f"{slide_path.stem}_{target_mpp:g}_{tile_px}.h5"
    h5io.write_patches(h5_path, big.coords, h5io.coords_attrs(big, slide_path.stem, slide.level_dimensions), {})
    t3 = time.perf_counter()
    slide.close()
    setup = {"tissue_ms": (t1 - t0) * 1e3, "grid_ms": (t2 - t1) * 1e3, "h5_ms": (t3 - t2) * 1e3}
    return Case(label, slide_path, target_mpp, grid, big, repeats, h5_path, setup)


def check_same_pixels(case: Case, n: int = 8) -> int:
    """Largest |difference| between the two loaders' first ``n`` tiles (0 = the comparison is like for like)."""
    naive = NaiveClamBag(case.h5_path, case.slide_path)
    ours = TileBatches(case.slide_path, case.grid, batch_size=n)[0][0]
    diff = 0
    for i in range(min(n, len(ours))):
        a, b = ours[i].int(), naive[i][0].int()
        if a.shape != b.shape:
            raise AssertionError(f"{case.label}: tile {i} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        diff = max(diff, int((a - b).abs().max()))
    return diff


def bench_loaders(case: Case, workers: Sequence[int], batch_size: int, repeats: int) -> list[dict[str, float]]:
    """Median tiles/s of both loaders for each worker count; passes alternate naive/pathopeft."""
    rows = []
    for w in workers:
        times: dict[str, list[float]] = {"naive": [], "pathopeft": []}
        makers: dict[str, Callable[[], Dataset]] = {
            "naive": lambda: NaiveClamBag(case.h5_path, case.slide_path),
            "pathopeft": lambda: TileBatches(case.slide_path, case.grid, batch_size),
        }
        for _ in range(repeats):
            for name, make in makers.items():
                dt, n = time_pass(make, batch_size, w)
                if n != len(case.grid):
                    raise AssertionError(f"{name} yielded {n} tiles, expected {len(case.grid)}")
                times[name].append(dt)
        naive = len(case.grid) / min(times["naive"])
        ours = len(case.grid) / min(times["pathopeft"])
        rows.append({"workers": w, "naive": naive, "pathopeft": ours})
        med = {k: len(case.grid) / statistics.median(v) for k, v in times.items()}
        log(
            f"  {case.label} {case.target_mpp:g} µm/px w={w}: naive {naive:.0f} (median {med['naive']:.0f}), "
            f"pathopeft {ours:.0f} (median {med['pathopeft']:.0f}) tiles/s"
        )
    return rows


@torch.inference_mode()
def bare_model_tps(model: torch.nn.Module, batch_size: int, input_size: int, batches: int) -> float:
    """Tiles/s of the model alone on random, already normalised tensors: fastest of ``batches`` timed batches."""
    model = model.eval()
    x = torch.randn(batch_size, 3, input_size, input_size)
    model(x)  # untimed warm-up
    best = math.inf
    for _ in range(batches):
        t0 = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t0)
    return batch_size / best


def load_avg() -> str:
    """1/5/15-minute load averages (other processes on the cores make every number here slower)."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


# --- Markdown -----------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tiles_cell(case: Case) -> str:
    unique = len(case.base)
    return f"{unique}×{case.repeats} = {len(case.grid)}" if case.repeats > 1 else str(unique)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="real one-level slide (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer tiles and repeats (a smoke run, noisier numbers)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers (default: 0 1 2)")
    p.add_argument("--tile-px", type=int, default=224, help="tile size at the target mpp (default: 224)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for every loader (default: 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per loader (default: 3; --quick: 2)")
    p.add_argument(
        "--min-tiles", type=int, default=None, help="repeat the coords list up to this many (default 1000; quick 300)"
    )
    p.add_argument("--pyramid-mpps", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="targets on the pyramid")
    p.add_argument(
        "--pyramid-compression", default="jpeg", choices=["jpeg", "zlib"], help="tile codec of the derived pyramid"
    )
    p.add_argument(
        "--models",
        nargs="*",
        default=["vit_tiny_patch16_224", "vit_small_patch16_224"],
        help="timm models for the end-to-end table (random init; none = skip)",
    )
    p.add_argument("--e2e-repeats", type=int, default=None, help="end-to-end passes (default: 2; --quick: 1)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads in the main process (default: CPU count)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown to this file")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.min_tiles = args.min_tiles or (300 if args.quick else 1000)
    args.e2e_repeats = args.e2e_repeats or (1 if args.quick else 2)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if any(w < 0 for w in args.workers):
        p.error("--workers must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.slide.is_file():
        log(f"slide {args.slide} not found (use --slide or set PATHOPEFT_SHARED)")
        return 2
    torch.set_num_threads(args.threads)  # DataLoader workers run with 1 thread each regardless
    import openslide
    import timm

    started = time.perf_counter()
    out: list[str] = []
    cores = len(os.sched_getaffinity(0))
    out.append(
        f"Python {platform.python_version()}, torch {torch.__version__} ({args.threads} intra-op threads), "
        f"timm {timm.__version__}, OpenSlide {openslide.__library_version__} (openslide-python "
        f"{openslide.__version__}), {cores} CPU cores visible, CUDA {'yes' if torch.cuda.is_available() else 'no'}."
        f" Tile {args.tile_px} px, batch {args.batch_size}, best of {args.repeats} passes per loader; every pass"
        " builds a fresh dataset + DataLoader (fresh slide handles, worker start-up included)."
        f" Load average at start: {load_avg()}."
    )

    with tempfile.TemporaryDirectory(prefix="wsi_throughput_") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        pyramid = make_pyramid(args.slide, workdir / "cmu1_pyramid.tif", compression=args.pyramid_compression)
        pyr_s = time.perf_counter() - t0
        with open_slide(pyramid) as ps:
            if ps.level_count != 4 or ps.mpp is None or abs(ps.mpp - 0.499) > 0.01:
                raise SystemExit(f"derived pyramid is wrong: {ps!r}, mpp {ps.mpp}")
            pyr_desc = (
                f"Derived pyramid: {ps.level_count} levels {list(ps.level_dimensions)}, mpp {ps.mpp:.3f}, "
                f"{args.pyramid_compression} tiles 256 px, {pyramid.stat().st_size / 2**20:.1f} MiB, "
                f"written in {pyr_s:.2f} s; OpenSlide vendor {ps.properties.get('openslide.vendor')}."
            )
        log(pyr_desc)
        out.append(pyr_desc)

        specs = [("CMU-1-Small-Region.svs", args.slide, 0.5)]
        specs += [("CMU-1 pyramid (derived)", pyramid, m) for m in args.pyramid_mpps]
        cases = [prepare_case(label, path, mpp, args.tile_px, args.min_tiles, workdir) for label, path, mpp in specs]

        setup_rows = []
        for c in cases:
            diff = check_same_pixels(c)
            setup_rows.append(
                [
                    c.label,
                    f"{c.target_mpp:g}",
                    c.grid.choice.level,
                    f"{c.grid.read_px} → {c.grid.tile_px}",
                    len(c.base),
                    f"{c.setup['tissue_ms']:.0f}",
                    f"{c.setup['grid_ms']:.2f}",
                    f"{c.setup['h5_ms']:.1f}",
                    diff,
                ]
            )
        out.append("### Setup per slide and target")
        out.append(
            md_table(
                [
                    "slide",
                    "target mpp",
                    "level read",
                    "read px → tile px",
                    "tiles",
                    "detect_tissue ms",
                    "tile_grid ms",
                    "coords H5 write ms",
                    "max |pathopeft − naive| (8 tiles)",
                ],
                setup_rows,
            )
        )

        log("loader passes …")
        rows = []
        for c in cases:
            for r in bench_loaders(c, args.workers, args.batch_size, args.repeats):
                rows.append(
                    [
                        c.label,
                        f"{c.target_mpp:g}",
                        c.grid.choice.level,
                        tiles_cell(c),
                        r["workers"],
                        f"{r['naive']:.0f}",
                        f"{r['pathopeft']:.0f}",
                        f"{r['pathopeft'] / r['naive']:.2f}×",
                    ]
                )
        out.append("### Reading + decoding + collating (DataLoader, no model)")
        out.append(
            md_table(
                [
                    "slide",
                    "target mpp",
                    "level read",
                    "tiles",
                    "workers",
                    "naive tiles/s",
                    "pathopeft tiles/s",
                    "speed-up",
                ],
                rows,
            )
        )

        if args.models:
            e2e = cases[0]  # the real slide, every tile once
            grid = e2e.base
            n_batches = math.ceil(len(grid) / args.batch_size)
            e2e_rows = []
            for name in args.models:
                bb = create_backbone(name)
                bare = bare_model_tps(bb.model, args.batch_size, bb.input_size, max(2, n_batches))
                log(f"  {name}: bare model {bare:.1f} tiles/s")
                for w in args.workers:
                    ts = []
                    for _ in range(args.e2e_repeats):
                        t0 = time.perf_counter()
                        feats, _coords = extract_features(
                            e2e.slide_path, grid, bb, batch_size=args.batch_size, num_workers=w, device="cpu"
                        )
                        ts.append(time.perf_counter() - t0)
                        if feats.shape != (len(grid), bb.dim) or not np.isfinite(feats).all():
                            raise AssertionError(f"{name}: bad features {feats.shape}")
                    tps = len(grid) / min(ts)
                    log(f"  {name} w={w}: end-to-end {tps:.1f} tiles/s")
                    e2e_rows.append(
                        [
                            name,
                            e2e.label,
                            f"{e2e.target_mpp:g}",
                            len(grid),
                            args.batch_size,
                            w,
                            f"{bare:.1f}",
                            f"{tps:.1f}",
                            f"{100 * tps / bare:.0f} %",
                        ]
                    )
            out.append(f"### End to end: extract_features on CPU (random-init timm ViT, best of {args.e2e_repeats})")
            out.append(
                md_table(
                    [
                        "model",
                        "slide",
                        "target mpp",
                        "tiles",
                        "batch",
                        "workers",
                        "bare model tiles/s",
                        "end-to-end tiles/s",
                        "% of bare",
                    ],
                    e2e_rows,
                )
            )

    out.append(f"Total benchmark time {time.perf_counter() - started:.0f} s; load average at the end: {load_avg()}.")
    text = "\n\n".join(out) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
