"""The whole path on real slides: slides → tissue/tiles/features (WSI stage) → continual MIL → heatmaps."""

from __future__ import annotations

import csv

import pytest

from pathopeft.mil.continual import ContinualConfig, run_continual
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, read_manifest, run_batch
from tests._tiny import TINY_VIT


@pytest.mark.slow
@pytest.mark.shared
def test_slides_to_features_to_comel_heatmap(slides_dir, tmp_path):
    wsi_csv = tmp_path / "slides.csv"
    wsi_csv.write_text(
        "slide_id,path,mpp\n"
        f"cmu,{slides_dir / 'CMU-1-Small-Region.svs'},\n"
        f"tcga,{slides_dir / 'tcga-cr-7395-01a-01-ts1.svs'},0.25\n"
    )
    kw = dict(TINY_VIT)
    name = kw.pop("name")
    cfg = BatchConfig(
        out_dir=str(tmp_path / "wsi"), tiling=TilingConfig(target_mpp=1.0, tile_px=64),
        extract=ExtractConfig(backbone=name, backbone_kwargs=kw, num_workers=0), progress=False,
    )  # fmt: skip
    records = run_batch(read_manifest(wsi_csv), cfg)
    assert [r["status"] for r in records] == ["done", "done"]
    feats = tmp_path / "wsi" / f"features_{name}"
    # two real slides as bags: the same files serve train and test (an integration check, not an evaluation)
    bags = tmp_path / "bags.csv"
    with bags.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "label", "task", "split"])
        for split in ("train", "test"):
            w.writerow([f"cmu_{split}", feats / "cmu.h5", "benign", "t", split])
            w.writerow([f"tcga_{split}", feats / "tcga.h5", "tumour", "t", split])
    state = run_continual(
        ContinualConfig(
            manifest=str(bags), out_dir=str(tmp_path / "mil"), classes=["benign", "tumour"], tasks=["t"],
            task_class={"t": "tumour"}, epochs=2, model_kwargs={"hidden_dim": 16, "heads": 2},
        )
    )  # fmt: skip
    assert state["done"] == 1
    heatmaps = list((tmp_path / "mil" / "comel-class" / "heatmaps").glob("*.png"))
    assert [p.name for p in heatmaps] == ["tcga_test.png"]
    assert heatmaps[0].stat().st_size > 10_000
