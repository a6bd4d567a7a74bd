"""The configs and manifests the repo ships are valid (a stale example is a bug)."""

from pathlib import Path

import pytest

from pathopeft.cli import _build_batch_config, build_parser
from pathopeft.wsi.config import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs" / "wsi").glob("*.yaml")), ids=lambda p: p.name)
def test_wsi_configs_parse(cfg, tmp_path):
    args = build_parser().parse_args(
        ["wsi", "process", "--slides", "x.svs", "--out", str(tmp_path), "--config", str(cfg)]
    )
    bc = _build_batch_config(args, features=True)
    assert bc.tiling.target_mpp > 0
    assert bc.extract.backbone


@pytest.mark.shared
def test_test_slides_manifest_points_at_shared(shared_dir):
    if shared_dir.resolve() != (ROOT.parent / "shared").resolve():
        pytest.skip("the manifest's relative paths assume ../shared beside the repo")
    entries = read_manifest(ROOT / "data_manifests" / "test_slides.csv")
    assert len(entries) == 6
    missing = [e.path for e in entries if not e.path.is_file()]
    assert not missing, f"manifest paths not found: {missing}"


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs" / "mil").glob("*.yaml")), ids=lambda p: p.name)
def test_mil_configs_parse(cfg):
    from pathopeft.mil.continual import load_config
    from pathopeft.mil.models import create_mil_model

    c = load_config(cfg)
    assert c.tasks
    create_mil_model(c.model, in_dim=8, n_classes=len(c.classes), **c.model_kwargs)  # kwargs fit the model
