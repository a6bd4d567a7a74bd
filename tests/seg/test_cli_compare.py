"""The seg CLI end to end on the GlaS fixture: LightningCLI fit from a YAML twin, predict, compare."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from pathopeft.cli import main
from pathopeft.seg.compare import CompareConfig, run_compare
from pathopeft.seg.data import write_glas_manifest

HERE = Path(__file__).parent
REPO = HERE.parents[1]


@pytest.fixture
def glas_manifest(shared_dir, tmp_path):
    root = shared_dir / "data" / "glas_subset22"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    out = write_glas_manifest(root, tmp_path / "glas.csv", split_map={"testA": "train"})
    rows = list(csv.DictReader(out.open()))
    assert {r["split"] for r in rows} == {"train", "test"}
    return out


@pytest.mark.shared
def test_fit_from_yaml_then_predict(glas_manifest, tmp_path):
    cfg = (HERE / "conf" / "tiny_fit.yaml").read_text().replace("MANIFEST", str(glas_manifest))
    (tmp_path / "fit.yaml").write_text(cfg)
    ckpt = tmp_path / "last.ckpt"
    assert main(["seg", "fit", "--config", str(tmp_path / "fit.yaml"), f"--trainer.default_root_dir={tmp_path}"]) == 0
    found = list(tmp_path.rglob("*.ckpt"))
    assert found, "LightningCLI wrote no checkpoint"
    found[0].rename(ckpt)
    image = next(r["image"] for r in csv.DictReader(glas_manifest.open()))
    image = (glas_manifest.parent / image).resolve()
    assert (
        main(["seg", "predict", "--ckpt", str(ckpt), "--out", str(tmp_path / "pred"), "--crop", "32", str(image)]) == 0
    )
    from PIL import Image

    mask = Image.open(tmp_path / "pred" / f"{image.stem}_mask.png")
    assert mask.size == Image.open(image).size  # stitched back to full size


@pytest.mark.slow
@pytest.mark.shared
def test_compare_writes_a_report(glas_manifest, tmp_path):
    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["frozen", "lora"], rank=2, lrs=[1e-3, 1e-2], seeds=[0, 1], max_steps=3, val_fraction=0.25,
        eval_batch=64, grid_images=1,
    )  # fmt: skip
    rows = run_compare(cfg)
    assert [r["method"] for r in rows] == ["frozen", "lora"]
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["n_seeds"] == 2 for r in rows)
    assert rows[0]["trainable"] < rows[1]["trainable"]  # adapters add parameters to the decoder's
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| lora |" in report
    assert "RANDOM INIT" in report
    assert (tmp_path / "cmp" / "grid.png").stat().st_size > 5_000
    assert len(list((tmp_path / "cmp" / "runs").glob("*.json"))) == 2 + 2 + 2  # 2 LRs + 1 extra seed per method


@pytest.mark.slow
@pytest.mark.shared
def test_compare_resumes_and_only_trains_what_is_missing(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.seg import compare

    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["lora"], rank=2, lrs=[1e-3, 1e-2], seeds=[0], max_steps=2, val_fraction=0.25, grid_images=1,
    )  # fmt: skip
    first = run_compare(cfg)
    trained = []
    real_fit = compare.fit_one
    monkeypatch.setattr(
        compare, "fit_one", lambda c, m, lr, s, dm: trained.append((m, lr, s)) or real_fit(c, m, lr, s, dm)
    )
    assert run_compare(cfg)[0]["dice_mean"] == first[0]["dice_mean"]  # everything reused
    assert trained == []
    cfg.seeds = [0, 1]
    assert run_compare(cfg)[0]["n_seeds"] == 2
    assert trained == [("lora", first[0]["best_lr"], 1)]  # only the new seed, at the chosen LR
    cfg.max_steps = 3  # a different run: old records are not reused
    run_compare(cfg)
    assert len(trained) == 1 + 3


@pytest.mark.parametrize("cfg", sorted((REPO / "configs" / "seg").glob("compare_*.yaml")), ids=lambda p: p.name)
def test_compare_configs_parse(cfg):
    CompareConfig(**yaml.safe_load(cfg.read_text()))
