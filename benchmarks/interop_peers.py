"""CLAM's and TRIDENT's own reading code on a `pathopeft wsi export` (issue 14, item 3): tiles and features back.

Runs in the peer scratch environment (``--peer-python``, see ``wsi_peers.py``) with scratch copies of CLAM and
TRIDENT, nothing of theirs imported into pathopeft. For each exported slide it checks, with their code:

* CLAM: ``Generic_MIL_Dataset`` (training) loads ``pt_files/<id>.pt`` and, with ``load_from_h5(True)``,
  ``h5_files/<id>.h5`` → the same features and coordinates as pathopeft's file; ``Whole_Slide_Bag_FP`` reads the
  tiles of ``patches/<id>.h5`` → the pixels pathopeft's extraction read;
* TRIDENT: ``read_coords`` on ``<mag>x_<px>px_<ov>px_overlap/patches/<id>_patches.h5`` → our coordinates, its
  ``WSIPatcher`` over ``OpenSlideWSI`` with those coordinates and attributes → our tiles, the features file its
  slide encoders open → our features, and ``contours_geojson/<id>.geojson`` read by geopandas.

Usage::

    pathopeft wsi process --sample --out runs/demo
    pathopeft wsi export runs/demo --to clam --out runs/demo_clam
    pathopeft wsi export runs/demo --to trident --out runs/demo_trident
    python benchmarks/interop_peers.py --run runs/demo --clam runs/demo_clam --trident runs/demo_trident \\
        --peer-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

CHECK = """
import csv, json, sys, tempfile
import h5py, numpy as np, torch
RUN, CLAM_OUT, TRIDENT_OUT, CLAM_SRC, TRIDENT_SRC, SLIDES = {args}
results = {{}}
sys.path.insert(0, CLAM_SRC)
from dataset_modules.dataset_generic import Generic_MIL_Dataset
from dataset_modules.dataset_h5 import Whole_Slide_Bag_FP
import openslide, contextlib, io
sys.path.insert(0, TRIDENT_SRC)
from trident import OpenSlideWSI
from trident.IO import read_coords
from trident.wsi_objects.WSIPatcher import WSIPatcher
import geopandas as gpd
for slide_id, slide_path, feat_dir in SLIDES:
    r = results[slide_id] = {{}}
    with h5py.File(f"{{RUN}}/{{feat_dir}}/{{slide_id}}.h5") as f:
        ours_f, ours_c = f["features"][:], f["coords"][:]
    with h5py.File(f"{{RUN}}/patches/{{slide_id}}.h5") as f:
        attrs = dict(f["coords"].attrs)
    # CLAM training
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as t:
        w = csv.writer(t); w.writerow(["case_id", "slide_id", "label"]); w.writerow(["p0", slide_id, "a"])
    with contextlib.redirect_stdout(io.StringIO()):
        ds = Generic_MIL_Dataset(csv_path=t.name, data_dir=f"{{CLAM_OUT}}/{{feat_dir}}", label_dict={{"a": 0}},
                                 shuffle=False, print_info=False)
    feats, _ = ds[0]
    r["clam_pt_features_equal"] = bool(np.array_equal(feats.numpy(), ours_f))
    ds.load_from_h5(True)
    feats, _, coords = ds[0]
    r["clam_h5_features_and_coords_equal"] = bool(np.array_equal(feats.numpy(), ours_f) and np.array_equal(coords, ours_c))
    # CLAM's tile reader on the exported coords
    with contextlib.redirect_stdout(io.StringIO()):
        bag = Whole_Slide_Bag_FP(f"{{CLAM_OUT}}/patches/{{slide_id}}.h5", openslide.OpenSlide(slide_path), lambda im: np.asarray(im))
    clam_tiles = np.stack([bag[i]["img"] for i in range(len(bag))])
    # TRIDENT
    mag = attrs["tile_magnification"]
    folder = f"{{TRIDENT_OUT}}/{{mag:g}}x_{{attrs['target_patch_size']}}px_{{attrs['overlap']}}px_overlap"
    t_attrs, t_coords = read_coords(f"{{folder}}/patches/{{slide_id}}_patches.h5")
    r["trident_coords_equal"] = bool(np.array_equal(t_coords, ours_c))
    wsi = OpenSlideWSI(slide_path=slide_path, lazy_init=False)
    patcher = WSIPatcher(wsi, int(t_attrs["target_patch_size"]), src_pixel_size=wsi.mpp,
                         dst_pixel_size=float(t_attrs["target_mpp"]), custom_coords=t_coords)
    tri_tiles = np.stack([patcher[i][0] for i in range(len(patcher))])
    with h5py.File(f"{{folder}}/{{feat_dir}}/{{slide_id}}.h5") as f:
        r["trident_features_equal"] = bool(np.array_equal(f["features"][:], ours_f) and np.array_equal(f["coords"][:], ours_c))
        r["trident_patch_size_level0"] = int(dict(f["coords"].attrs).get("patch_size_level0", -1))
    r["trident_contours"] = len(gpd.read_file(f"{{TRIDENT_OUT}}/contours_geojson/{{slide_id}}.geojson"))
    np.save(f"{{tempfile.gettempdir()}}/interop_{{slide_id}}_clam.npy", clam_tiles)
    np.save(f"{{tempfile.gettempdir()}}/interop_{{slide_id}}_trident.npy", tri_tiles)
    r["tiles_files"] = [f"{{tempfile.gettempdir()}}/interop_{{slide_id}}_clam.npy", f"{{tempfile.gettempdir()}}/interop_{{slide_id}}_trident.npy"]
print("RESULT", json.dumps(results))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--clam", type=Path, required=True, help="the --to clam export")
    p.add_argument("--trident", type=Path, required=True, help="the --to trident export")
    p.add_argument("--peer-python", required=True)
    p.add_argument("--clam-src", default="/tmp/peer_src/CLAM")
    p.add_argument("--trident-src", default="/tmp/peer_src/TRIDENT")
    args = p.parse_args(argv)
    import h5py
    import numpy as np

    from pathopeft.wsi.extract import TileBatches
    from pathopeft.wsi.slide import open_slide
    from pathopeft.wsi.tiling import tile_grid

    slides = []
    for fdir in sorted(args.run.glob("features_*")):
        for h5 in sorted(fdir.glob("*.h5")):
            with h5py.File(h5) as f:
                slides.append((h5.stem, str(f.attrs["slide_path"]), fdir.name))
    code = CHECK.format(
        args=repr((str(args.run), str(args.clam), str(args.trident), args.clam_src, args.trident_src, slides))
    )
    proc = subprocess.run([args.peer_python, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    results = json.loads(line[7:])
    for slide_id, path, fdir in slides:
        r = results[slide_id]
        with h5py.File(args.run / fdir / f"{slide_id}.h5") as f:
            coords = f["coords"][:]
        with h5py.File(args.run / "patches" / f"{slide_id}.h5") as f:
            a = dict(f["coords"].attrs)
        with open_slide(path) as s:  # pathopeft's tiles for the same coordinates, as extraction read them
            grid = tile_grid(
                s.dimensions, s.level_downsamples, s.mpp, float(a["target_mpp"]), int(a["target_patch_size"])
            )
        grid = dataclasses.replace(grid, coords=coords, tissue_fraction=np.ones(len(coords)))
        ours = TileBatches(path, grid, batch_size=len(coords))[0][0].permute(0, 2, 3, 1).numpy()
        for tool, f in zip(("CLAM Whole_Slide_Bag_FP", "TRIDENT WSIPatcher"), r.pop("tiles_files"), strict=True):
            theirs = np.load(f)[..., :3]
            diff = np.abs(theirs.astype(int) - ours.astype(int))
            r[f"{tool} tiles: max |Δ|"] = int(diff.max()) if theirs.shape == ours.shape else f"shape {theirs.shape}"
        print(f"{slide_id} ({fdir}, {len(coords)} tiles):")
        for k, v in r.items():
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
