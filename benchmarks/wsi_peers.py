"""WSI read + decode throughput against peer toolkits, in one run (issue 13, item 6; partial).

The same tile coordinates (a contiguous run of pathopeft's tissue grid at 0.5 µm/px, 224 px) are read by every
tool in interleaved rounds, each measurement in a fresh process (cold caches, imports not timed):

* pathopeft ``tiff-direct`` (``Slide.read_tiles`` into uint8 batches);
* the CLAM-style loader (``Whole_Slide_Bag_FP``'s recipe through a DataLoader, from ``wsi_throughput.py``);
* tiatoolbox ``WSIReader.open(...).read_rect(xy, 224, resolution=0.5, units="mpp")`` (its TIFF reader);
* LazySlide's reader (``wsidata.open_wsi(...).reader.get_region`` at level 0 + its 2× resize with OpenCV area).

Peers run from a scratch environment given by ``--peer-python`` (one where ``tiatoolbox`` and ``wsidata`` import);
nothing of theirs is imported here. TRIDENT, CLAM's own code and cuCIM are not driven yet.

Usage::

    python benchmarks/wsi_peers.py --peer-python /tmp/peers/bin/python --tiles 512 --rounds 3
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

DRIVERS = {
    "pathopeft tiff-direct": """
        from pathopeft.wsi.tiff_direct import DirectTiffSlide
        def setup():
            return DirectTiffSlide(SLIDE)
        def run(s):
            for i in range(0, len(COORDS), 64):
                s.read_tiles(COORDS[i:i + 64], 0, READ_PX, TILE_PX)
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
    "tiatoolbox 2.1 (TIFFWSIReader read_rect)": """
        import logging; logging.disable(logging.WARNING)
        from tiatoolbox.wsicore.wsireader import WSIReader
        def setup():
            return WSIReader.open(SLIDE)
        def run(r):
            for x, y in COORDS:
                r.read_rect((int(x), int(y)), (TILE_PX, TILE_PX), resolution=MPP, units="mpp")
    """,
    "LazySlide 0.13 (wsidata reader get_region + area resize)": """
        import cv2, wsidata
        def setup():
            return wsidata.open_wsi(SLIDE).reader
        def run(r):
            for x, y in COORDS:
                img = r.get_region(int(x), int(y), READ_PX, READ_PX, level=0)
                cv2.resize(img, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    """,
}

HARNESS = """
import json, time, numpy as np
COORDS = np.load({coords!r}); SLIDE = {slide!r}; H5 = {h5!r}; HERE = {here!r}
READ_PX, TILE_PX, MPP = {read_px}, {tile_px}, {mpp}
{driver}
obj = setup()
t0 = time.perf_counter()
run(obj)
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t0, "tiles": len(COORDS)}}))
"""


def measure(python: str, driver: str, params: dict) -> float | None:
    code = HARNESS.format(driver=textwrap.dedent(driver), **params)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            return r["tiles"] / r["seconds"]
    print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "runs" / "bench_wsi" / "mosaic.tiff")
    p.add_argument("--peer-python", required=True, help="python of the scratch environment with the peers")
    p.add_argument("--tiles", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from wsi_reader import slide_case

    from pathopeft.wsi import h5io
    from pathopeft.wsi.slide import open_slide

    grid = slide_case(args.slide, None, args.tiles, 224, 0.5)
    if grid.choice.level != 0:
        raise SystemExit("this driver reads level 0 (a 40×-like slide at 0.5 µm/px)")
    with tempfile.TemporaryDirectory() as tmp:
        coords, h5 = Path(tmp) / "coords.npy", Path(tmp) / "coords.h5"
        np.save(coords, grid.coords)
        with open_slide(args.slide) as s:
            h5io.write_patches(h5, grid.coords, h5io.coords_attrs(grid, "mosaic", s.level_dimensions), {})
        params = {"coords": str(coords), "slide": str(args.slide), "h5": str(h5), "here": str(HERE),
                  "read_px": grid.read_px, "tile_px": grid.tile_px, "mpp": 0.5}  # fmt: skip
        rates: dict[str, list[float]] = {k: [] for k in DRIVERS}
        for r in range(args.rounds):
            for name, driver in DRIVERS.items():
                python = sys.executable if name.startswith(("pathopeft", "CLAM")) else args.peer_python
                rate = measure(python, driver, params)
                if rate is not None:
                    rates[name].append(rate)
            print(f"round {r + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.0f}" for k, v in rates.items() if v),
                  file=sys.stderr)  # fmt: skip
    best = {k: max(v) for k, v in rates.items() if v}
    clam = best.get("CLAM-style loader")
    fastest_peer = max((v for k, v in best.items() if not k.startswith(("pathopeft", "CLAM"))), default=None)
    print(f"{len(grid.coords)} tiles of 224 px at 0.5 µm/px from {args.slide.name} (448 level-0 px, 2× shrink), "
          f"best of {args.rounds} interleaved rounds, each a fresh process; load average at the end "
          f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}.\n")  # fmt: skip
    print("| tool | tiles/s (best) | × CLAM-style | × fastest peer |")
    print("|---|---:|---:|---:|")
    for k, v in best.items():
        peer = f"{v / fastest_peer:.2f}×" if fastest_peer else "—"
        print(f"| {k} | {v:.0f} | {v / clam:.2f}× | {peer} |" if clam else f"| {k} | {v:.0f} | — | {peer} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
