"""The end-to-end jobs in pipelines/: each runs from its YAML on small generated data and resumes."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tifffile

from pathopeft.wsi.pyramid import write_pyramid
from tests._tiny import TINY_VIT, blob_image

ROOT = Path(__file__).resolve().parents[1]


def _pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_slides_to_mil_end_to_end_and_resume(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for k, (label, colour_shift) in enumerate([("benign", 0), ("tumour", 60), ("benign", 0), ("tumour", 60)]):
        img = blob_image(512, 512, ((256, 256, 180),))
        img[..., 1] = (img[..., 1].astype(int) + colour_shift).clip(0, 255).astype("uint8")
        write_pyramid(img, data / f"s{k}.tiff", mpp=0.5, levels=2, tile=128)
        rows.append([f"s{k}", f"s{k}.tiff", "", label, "t", "train" if k < 2 else "test"])
    tifffile.imwrite(data / "nompp.tiff", blob_image(256, 256), tile=(128, 128), photometric="rgb")
    rows.append(["nompp", "nompp.tiff", "", "benign", "t", "train"])
    with (data / "slides.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "path", "mpp", "label", "task", "split"], *rows])
    tiny = {k: v for k, v in TINY_VIT.items() if k != "name"}
    config = tmp_path / "cfg" / "p.yaml"
    config.parent.mkdir()
    config.write_text(
        "slides: ../data/slides.csv\n"  # relative to the YAML
        f"out_dir: {tmp_path / 'out'}\n"
        "tiling: {target_mpp: 1.0, tile_px: 32}\n"
        f"extract: {{backbone: {TINY_VIT['name']}, backbone_kwargs: {json.dumps(tiny)}, num_workers: 0}}\n"
        "mil: {strategy: finetune, classes: [benign, tumour], tasks: [t], task_class: {t: tumour}, epochs: 1,"
        " model: abmil, heatmaps: 0}\n"
        "progress: false\n"
    )
    job = _pipeline("slides_to_mil")
    assert job.main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    bags = list(csv.DictReader((out / "bags.csv").open()))
    assert [b["slide_id"] for b in bags] == ["s0", "s1", "s2", "s3"]
    assert all((out / b["path"]).is_file() for b in bags)  # relative to bags.csv
    left = list(csv.DictReader((out / "bags_left_out.csv").open()))
    assert left == [{"slide_id": "nompp", "status": "skipped", "reason": "no mpp"}]
    assert "left out of the bags: nompp (skipped: no mpp)" in capsys.readouterr().err
    state = json.loads((out / "mil" / "finetune-class" / "state.json").read_text())
    assert state["done"] == 1
    before = (out / "mil" / "finetune-class" / "results.csv").read_text()
    assert job.main(["--config", str(config)]) == 0  # a rerun redoes nothing and changes nothing
    assert (out / "mil" / "finetune-class" / "results.csv").read_text() == before


def test_slides_to_mil_bad_config_is_one_line(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("slides: nope.csv\nmil: {}\ntilling: {}\n")  # an empty section too
    assert _pipeline("slides_to_mil").main(["--config", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'tilling'" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.shared
def test_seg_to_wsi_trains_exports_and_extracts_with_the_adapter(shared_dir, tmp_path):
    from pathopeft.datasets.glas import write_glas_manifest
    from pathopeft.wsi import h5io

    glas = write_glas_manifest(
        shared_dir / "data" / "glas_subset22", tmp_path / "glas.csv", split_map={"testA": "train"}
    )
    fit_yaml = tmp_path / "fit.yaml"
    fit_yaml.write_text((ROOT / "tests" / "seg" / "conf" / "tiny_fit.yaml").read_text().replace("MANIFEST", str(glas)))
    write_pyramid(blob_image(512, 512, ((256, 256, 180),)), tmp_path / "s0.tiff", mpp=0.5, levels=2, tile=128)
    (tmp_path / "slides.csv").write_text("slide_id,path\ns0,s0.tiff\n")
    config = tmp_path / "p.yaml"
    config.write_text(
        f"seg_config: fit.yaml\nslides: slides.csv\nout_dir: {tmp_path / 'out'}\n"
        "tiling: {target_mpp: 1.0, tile_px: 32}\nbatch_size: 8\nnum_workers: 0\nprogress: false\n"
    )
    job = _pipeline("seg_to_wsi")
    assert job.main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["adapter_type"] == "salt"
    status = json.loads((out / "wsi" / "status" / "s0.json").read_text())
    assert status["status"] == "done", status
    feats, _ = h5io.read_features(out / "wsi" / "features_vit_tiny_patch16_224" / "s0.h5")
    assert feats.shape == (status["n_tiles"], 32)
    params = json.loads((out / "wsi" / "params.json").read_text())["features"]["features_vit_tiny_patch16_224"]
    assert params["params"]["adapter"] == str((out / "adapter").resolve())  # extracted with the adapted encoder
    assert job.main(["--config", str(config)]) == 0  # rerun: nothing retrained, nothing redone
