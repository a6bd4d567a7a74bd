"""`pathopeft wsi export`: the file layouts CLAM and TRIDENT read, with the same tiles' coordinates and features.

CLAM's and TRIDENT's own readers are run on an export by benchmarks/interop_peers.py (their code stays out of
the package); here the layout, names, keys and values they rely on are pinned."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pathopeft.cli import main
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, run_batch
from pathopeft.wsi.config import SlideEntry
from pathopeft.wsi.export import ExportError, export_run
from pathopeft.wsi.pyramid import write_pyramid
from tests._tiny import TINY_VIT, blob_image


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    slides = [SlideEntry(f"s{k}", write_pyramid(blob_image(768, 896, ((380, 450, 250),)), root / f"s{k}.tiff",
                                                mpp=0.5, levels=2, tile=128)) for k in range(2)]  # fmt: skip
    tiny = dict(TINY_VIT)
    name = tiny.pop("name")
    cfg = BatchConfig(out_dir=str(root / "run"), tiling=TilingConfig(target_mpp=1.0, tile_px=64),
                      extract=ExtractConfig(backbone=name, backbone_kwargs=tiny, num_workers=0, batch_size=8),
                      progress=False)  # fmt: skip
    assert all(r["status"] == "done" for r in run_batch(slides, cfg))
    return root / "run", name


def _features(path):
    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:]


def test_clam_layout_has_patches_h5_files_and_pt_files_with_our_features(run_dir, tmp_path):
    run, name = run_dir
    report = export_run(run, tmp_path / "clam", "clam")
    fdir = f"features_{name}"
    assert report.slides == {fdir: ["s0", "s1"]}
    assert not report.failed
    for sid in ("s0", "s1"):
        feats, coords = _features(run / fdir / f"{sid}.h5")
        pt = torch.load(tmp_path / "clam" / fdir / "pt_files" / f"{sid}.pt")  # what CLAM's training loads
        assert pt.dtype == torch.float32
        np.testing.assert_array_equal(pt.numpy(), feats)
        h5_feats, h5_coords = _features(tmp_path / "clam" / fdir / "h5_files" / f"{sid}.h5")
        np.testing.assert_array_equal(h5_feats, feats)
        np.testing.assert_array_equal(h5_coords, coords)
        with h5py.File(tmp_path / "clam" / "patches" / f"{sid}.h5") as f:  # create_patches_fp's output
            assert {"patch_level", "patch_size"} <= set(f["coords"].attrs)
        # hard links: no second copy on disk
        assert (tmp_path / "clam" / fdir / "h5_files" / f"{sid}.h5").stat().st_ino == (
            run / fdir / f"{sid}.h5"
        ).stat().st_ino


def test_trident_job_folder_names_and_contours(run_dir, tmp_path):
    run, name = run_dir
    export_run(run, tmp_path / "tri", "trident")
    coords_dir = tmp_path / "tri" / "10x_64px_0px_overlap"  # 1 µm/px = 10×, 64-px tiles
    for sid in ("s0", "s1"):
        with h5py.File(coords_dir / "patches" / f"{sid}_patches.h5") as f:
            attrs = dict(f["coords"].attrs)
            coords = f["coords"][:]
        assert attrs["patch_size_level0"] == 128  # TRIDENT's slide encoders read the level-0 footprint
        feats, fcoords = _features(coords_dir / f"features_{name}" / f"{sid}.h5")
        np.testing.assert_array_equal(fcoords, coords)
        np.testing.assert_array_equal(feats, _features(run / f"features_{name}" / f"{sid}.h5")[0])
        assert (
            (tmp_path / "tri" / "contours_geojson" / f"{sid}.geojson")
            .read_text()
            .startswith('{"type": "FeatureCollection"')
        )


def test_a_broken_slide_is_reported_and_the_others_exported(run_dir, tmp_path):
    import shutil

    run, name = run_dir
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "patches" / "s0.h5").unlink()
    report = export_run(broken, tmp_path / "clam", "clam")
    assert report.slides[f"features_{name}"] == ["s1"]
    assert "s0.h5 missing" in report.failed[f"features_{name}/s0"]


def test_export_errors_are_one_line(tmp_path, run_dir, capsys):
    with pytest.raises(ExportError, match="not a pathopeft WSI run folder"):
        export_run(tmp_path, tmp_path / "x", "clam")
    assert main(["wsi", "export", str(tmp_path), "--to", "trident", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    run, _ = run_dir
    assert main(["wsi", "export", str(run), "--to", "clam", "--out", str(tmp_path / "ok")]) == 0
    assert "2 slides exported for CLAM" in capsys.readouterr().out
