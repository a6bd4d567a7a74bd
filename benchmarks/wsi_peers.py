"""WSI read + decode throughput against peer toolkits, in one run (issue 13, item 6).

The same tile coordinates (a contiguous run of pathopeft's tissue grid at 0.5 µm/px, 224 px) are read by every
tool in interleaved rounds, each measurement in a fresh process (cold caches, imports not timed):

* pathopeft ``tiff-direct`` (``Slide.read_tiles`` into uint8 batches);
* the CLAM-style loader (``Whole_Slide_Bag_FP``'s recipe through a DataLoader, from ``wsi_throughput.py``);
* tiatoolbox ``WSIReader.open(...).read_rect(xy, 224, resolution=0.5, units="mpp")`` (its TIFF reader);
* LazySlide's reader (``wsidata.open_wsi(...).reader.get_region`` at level 0 + its 2× resize with OpenCV area);
* CLAM's own ``Whole_Slide_Bag_FP`` on pathopeft's coords H5 (CLAM-compatible attributes) with torchvision's
  ``Resize`` (its eval transform without ToTensor/Normalize, so every row ends at uint8 pixels);
* TRIDENT's ``WSIPatcher`` over ``OpenSlideWSI`` with the same coordinates;
* cuCIM's ``CuImage.read_region`` on CPU + an area resize.

Then each tool's slide → tissue → coordinates step with its shipped defaults (seconds and tile count), and the
JPEG decode limit of the same tiles in the same run. Peak RSS is each fresh process's maximum.

Peers run from a scratch environment given by ``--peer-python`` (one where ``tiatoolbox``, ``wsidata``,
``lazyslide`` and ``cucim`` import) and scratch copies of CLAM and TRIDENT (``--clam-src``, ``--trident-src``:
``git archive`` of the fetched repositories); nothing of theirs is imported here or enters the package.

Usage::

    python benchmarks/wsi_peers.py --peer-python /tmp/peers/bin/python --tiles 512 --rounds 3 \
        --clam-src /tmp/peer_src/CLAM --trident-src /tmp/peer_src/TRIDENT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LIMIT = "JPEG decode limit (DCT-scaled where it applies, each touched slide tile once)"

DRIVERS = {
    "pathopeft tiff-direct": """
        from pathopeft.wsi.tiff_direct import DirectTiffSlide
        def setup():
            return DirectTiffSlide(SLIDE)
        def run(s):
            for i in range(0, len(COORDS), 64):
                s.read_tiles(COORDS[i:i + 64], 0, READ_PX, TILE_PX)
    """,
    "pathopeft tiff-direct, 2 threads": """
        from pathopeft.wsi.tiff_direct import DirectTiffSlide
        def setup():
            return DirectTiffSlide(SLIDE, threads=2)
        def run(s):
            for i in range(0, len(COORDS), 64):
                s.read_tiles(COORDS[i:i + 64], 0, READ_PX, TILE_PX)
    """,
    LIMIT: """
        from pathopeft.wsi.tiff_direct import DirectTiffSlide, _decode_jpeg
        def setup():  # the compressed tiles the coordinates touch, read into memory untimed
            s = DirectTiffSlide(SLIDE)
            lv = s._levels[0]
            touched = sorted({i for x, y in COORDS for i in s._tiles_for(0, int(x), int(y), READ_PX, READ_PX)})
            return [s._raw(lv, i) for i in touched], lv, s.decode_scale(0, READ_PX, TILE_PX, COORDS)
        def run(obj):
            raw, lv, scale = obj
            for data in raw:
                _decode_jpeg(data, lv.tables, lv.rgb_jpeg, scale)
    """,
    "CLAM-style loader": """
        import sys; sys.path.insert(0, HERE)
        from torch.utils.data import DataLoader
        from wsi_throughput import NaiveClamBag
        def setup():
            return DataLoader(NaiveClamBag(H5, SLIDE), batch_size=64, num_workers=0)
        def run(loader):
            for _ in loader:
                pass
    """,
    "CLAM (its Whole_Slide_Bag_FP on our coords H5, torchvision Resize)": """
        import contextlib, io, sys; sys.path.insert(0, CLAM_SRC)
        import numpy as np, openslide
        from torchvision import transforms
        from dataset_modules.dataset_h5 import Whole_Slide_Bag_FP
        def setup():
            with contextlib.redirect_stdout(io.StringIO()):  # its summary() prints the attributes
                return Whole_Slide_Bag_FP(H5, openslide.OpenSlide(SLIDE), transforms.Resize(TILE_PX))
        def run(bag):
            for i in range(len(bag)):
                np.asarray(bag[i]["img"])
    """,
    "TRIDENT (OpenSlideWSI + WSIPatcher, custom coords)": """
        import sys; sys.path.insert(0, TRIDENT_SRC)
        from trident import OpenSlideWSI
        from trident.wsi_objects.WSIPatcher import WSIPatcher
        def setup():
            wsi = OpenSlideWSI(slide_path=SLIDE, lazy_init=False, mpp=MPP0)
            return WSIPatcher(wsi, TILE_PX, src_pixel_size=MPP0, dst_pixel_size=MPP, custom_coords=COORDS)
        def run(patcher):
            for i in range(len(patcher)):
                patcher[i]
    """,
    "tiatoolbox (TIFFWSIReader read_rect)": """
        import logging; logging.disable(logging.WARNING)
        from tiatoolbox.wsicore.wsireader import WSIReader
        def setup():
            return WSIReader.open(SLIDE)
        def run(r):
            for x, y in COORDS:
                r.read_rect((int(x), int(y)), (TILE_PX, TILE_PX), resolution=MPP, units="mpp")
    """,
    "LazySlide (wsidata reader get_region + area resize)": """
        import cv2, wsidata
        def setup():
            return wsidata.open_wsi(SLIDE).reader
        def run(r):
            for x, y in COORDS:
                img = r.get_region(int(x), int(y), READ_PX, READ_PX, level=0)
                cv2.resize(img, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    """,
    "cuCIM on CPU (CuImage read_region + area resize)": """
        import cv2, numpy as np
        from cucim import CuImage
        def setup():
            return CuImage(SLIDE)
        def run(img):
            for x, y in COORDS:
                region = np.asarray(img.read_region(location=(int(x), int(y)), size=(READ_PX, READ_PX), level=0))
                cv2.resize(region[..., :3], (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    """,
}

# Slide -> tissue -> tile coordinates at 0.5 µm/px, 224 px, each tool's shipped defaults; run() returns the count.
TISSUE_DRIVERS = {
    "pathopeft (OpenCV tissue at 8 µm/px + grid)": """
        from pathopeft.wsi.slide import open_slide
        from pathopeft.wsi.tiling import tile_grid
        from pathopeft.wsi.tissue import detect_tissue
        def setup():
            return open_slide(SLIDE)
        def run(s):
            tissue = detect_tissue(s)
            return len(tile_grid(s.dimensions, s.level_downsamples, s.mpp, MPP, TILE_PX, 0, tissue, 0.25).coords)
    """,
    "CLAM (segmentTissue + process_contours, create_patches_fp defaults)": """
        import contextlib, io, sys, tempfile; sys.path.insert(0, CLAM_SRC)
        from pathlib import Path
        import h5py
        from wsi_core.WholeSlideImage import WholeSlideImage
        def setup():
            return WholeSlideImage(SLIDE)
        def run(w):
            level = w.wsi.get_best_level_for_downsample(64)
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                w.segmentTissue(seg_level=level, sthresh=8, mthresh=7, close=4, use_otsu=False,
                                filter_params={"a_t": 100, "a_h": 16, "max_n_holes": 8})
                w.process_contours(tmp, patch_level=0, patch_size=READ_PX, step_size=READ_PX,
                                   use_padding=True, contour_fn="four_pt")
                path = Path(tmp) / f"{w.name}.h5"  # not written when no contour survives the filters
                if not path.is_file():
                    return 0
                with h5py.File(path) as f:
                    return len(f["coords"])
    """,
    "TRIDENT (otsu segmenter at 10×, extract_tissue_coords at 20×)": """
        import contextlib, glob, io, sys, tempfile; sys.path.insert(0, TRIDENT_SRC)
        import h5py
        from trident import OpenSlideWSI
        from trident.segmentation_models.load import segmentation_model_factory
        def setup():
            return OpenSlideWSI(slide_path=SLIDE, lazy_init=False, mpp=MPP0), segmentation_model_factory("otsu")
        def run(obj):
            wsi, model = obj
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                wsi.segment_tissue(model, target_mag=10, job_dir=tmp, device="cpu")
                wsi.extract_tissue_coords(target_mag=round(10 / MPP), patch_size=TILE_PX, save_coords=tmp)
                with h5py.File(glob.glob(tmp + "/**/*_patches.h5", recursive=True)[0]) as f:
                    return len(f["coords"])
    """,
    "tiatoolbox (tissue_mask otsu + sliding-window extractor)": """
        import logging; logging.disable(logging.WARNING)
        from tiatoolbox.tools.patchextraction import get_patch_extractor
        from tiatoolbox.wsicore.wsireader import WSIReader
        def setup():
            return WSIReader.open(SLIDE)
        def run(r):
            mask = r.tissue_mask(method="otsu", resolution=8, units="mpp")
            ex = get_patch_extractor("slidingwindow", input_img=r, input_mask=mask,
                                     patch_size=(TILE_PX, TILE_PX), resolution=MPP, units="mpp")
            return len(ex.coordinate_list)
    """,
    "LazySlide (pp.find_tissues + pp.tile_tissues)": """
        import lazyslide as zs, wsidata
        def setup():
            return wsidata.open_wsi(SLIDE)
        def run(w):
            zs.pp.find_tissues(w)
            zs.pp.tile_tissues(w, TILE_PX, mpp=MPP)
            return len(w["tiles"])
    """,
}

HARNESS = """
import json, resource, time, numpy as np
COORDS = np.load({coords!r}); SLIDE = {slide!r}; H5 = {h5!r}; HERE = {here!r}
CLAM_SRC, TRIDENT_SRC = {clam_src!r}, {trident_src!r}
READ_PX, TILE_PX, MPP, MPP0 = {read_px}, {tile_px}, {mpp}, {mpp0}
{driver}
obj = setup()
t0 = time.perf_counter()
count = run(obj)
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t0, "tiles": len(COORDS), "count": count,
                            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(python: str, driver: str, params: dict) -> dict | None:
    """Run one driver in a fresh process: {seconds, tiles, count, rss_mib}, or None (the error is printed)."""
    code = HARNESS.format(driver=textwrap.dedent(driver), **params)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        print("  failed: timed out after 900 s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def python_for(name: str, peer_python: str) -> str:
    return sys.executable if name.startswith(("pathopeft", "CLAM-style")) else peer_python


def interleaved(drivers: dict[str, str], rounds: int, peer_python: str, params: dict) -> dict[str, list[dict]]:
    """Every driver once per round, rounds interleaved so that load drifts hit all tools alike."""
    results: dict[str, list[dict]] = {k: [] for k in drivers}
    for r in range(rounds):
        for name, driver in drivers.items():
            res = measure(python_for(name, peer_python), driver, params)
            if res is not None:
                results[name].append(res)
        print(f"round {r + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]['seconds']:.2f} s" for k, v in results.items() if v),
              file=sys.stderr)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared")) / "test_slides"
    p.add_argument("--slides", type=Path, nargs="+",
                   default=[ROOT / "runs" / "bench_wsi" / "mosaic.tiff", shared / "CMU-1-Small-Region.svs"],
                   help="slides read at level 0 (mosaic.tiff: run wsi_reader.py once to build it)")  # fmt: skip
    p.add_argument("--peer-python", required=True, help="python of the scratch environment with the peers")
    p.add_argument("--clam-src", type=Path, default=Path("/tmp/peer_src/CLAM"), help="scratch copy of CLAM")
    p.add_argument("--trident-src", type=Path, default=Path("/tmp/peer_src/TRIDENT"), help="scratch copy of TRIDENT")
    p.add_argument("--tiles", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-tissue", action="store_true", help="only the read + decode table")
    args = p.parse_args(argv)
    for slide in args.slides:
        if not slide.is_file():
            print(f"{slide}: not found, skipped", file=sys.stderr)
            continue
        print(run_slide(slide, args))
    print(f"Load average at the end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    return 0


def run_slide(slide: Path, args: argparse.Namespace) -> str:
    """Both tables for one slide (tiles of 224 px at 0.5 µm/px read from level 0)."""
    sys.path.insert(0, str(HERE))
    from wsi_reader import slide_case

    from pathopeft.wsi import h5io
    from pathopeft.wsi.slide import open_slide

    grid = slide_case(slide, None, args.tiles, 224, 0.5)
    if grid.choice.level != 0:
        raise SystemExit(f"{slide}: these drivers read level 0; 0.5 µm/px falls on level {grid.choice.level}")
    with tempfile.TemporaryDirectory() as tmp:
        coords, h5 = Path(tmp) / "coords.npy", Path(tmp) / "coords.h5"
        np.save(coords, grid.coords)
        with open_slide(slide) as s:
            h5io.write_patches(h5, grid.coords, h5io.coords_attrs(grid, slide.stem, s.level_dimensions), {})
            mpp0 = s.mpp
        params = {"coords": str(coords), "slide": str(slide), "h5": str(h5), "here": str(HERE),
                  "clam_src": str(args.clam_src), "trident_src": str(args.trident_src),
                  "read_px": grid.read_px, "tile_px": grid.tile_px, "mpp": 0.5, "mpp0": mpp0}  # fmt: skip
        reads = interleaved(DRIVERS, args.rounds, args.peer_python, params)
        tissue = {} if args.skip_tissue else interleaved(TISSUE_DRIVERS, args.rounds, args.peer_python, params)
    shrink = grid.read_px / grid.tile_px
    out = [(f"### {slide.name}: {len(grid.coords)} tiles of 224 px at 0.5 µm/px ({grid.read_px} level-0 px, "
           f"{shrink:g}× shrink), best of {args.rounds} interleaved rounds, each a fresh process (imports untimed)"),
           "", read_table(reads)]  # fmt: skip
    if tissue:
        out += ["", f"Slide → tissue → tile coordinates (224 px at 0.5 µm/px), each tool's defaults, best of {args.rounds}:",
                "", tissue_table(tissue)]  # fmt: skip
    return "\n".join(out) + "\n"


def read_table(reads: dict[str, list[dict]]) -> str:
    best = {k: max(r["tiles"] / r["seconds"] for r in v) for k, v in reads.items() if v}
    rss = {k: max(r["rss_mib"] for r in v) for k, v in reads.items() if v}
    limit = best.pop(LIMIT, float("nan"))
    clam = best.get("CLAM-style loader")
    fastest = max((v for k, v in best.items() if not k.startswith(("pathopeft", "CLAM-style"))), default=None)
    rows = ["| tool | tiles/s (best) | × CLAM-style | × fastest peer | % of decode limit | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for k, v in best.items():
        ratio = f"{v / clam:.2f}×" if clam else "—"
        peer = f"{v / fastest:.2f}×" if fastest else "—"
        rows.append(f"| {k} | {v:.0f} | {ratio} | {peer} | {100 * v / limit:.0f} % | {rss[k]:.0f} |")
    rows.append(f"| {LIMIT}, interleaved like the rest | {limit:.0f} | {limit / clam:.2f}× | — | 100 % | — |"
                if clam else "")  # fmt: skip
    missing = [k for k, v in reads.items() if not v]
    if missing:
        rows.append(f"\nFailed (see stderr): {', '.join(missing)}.")
    return "\n".join(rows)


def tissue_table(tissue: dict[str, list[dict]]) -> str:
    rows = [
        "| tool | seconds (best) | tile coordinates | × pathopeft time | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    ours = min((r["seconds"] for r in tissue.get(next(iter(tissue)), [])), default=None)
    for k, v in tissue.items():
        if not v:
            rows.append(f"| {k} | failed | — | — | — |")
            continue
        t = min(r["seconds"] for r in v)
        rel = f"{t / ours:.1f}×" if ours else "—"
        rows.append(f"| {k} | {t:.2f} | {v[0]['count']} | {rel} | {max(r['rss_mib'] for r in v):.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
