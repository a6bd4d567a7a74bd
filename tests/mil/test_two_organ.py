"""The two-organ stream (lung, then oral): leakage-safe splits, disjoint classes, 2·task labels, a small build
that the continual runner accepts, and the DenseNet-121 feature path (mean 0 / std 1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pathopeft.datasets import oral_rahman, two_organ
from pathopeft.datasets.lc25000 import BagSpec, colour_centroid_baseline
from pathopeft.mil.config import load_config
from pathopeft.mil.continual import prepare_bags

pytestmark = pytest.mark.shared
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "configs" / "mil" / "comel_two_organ.yaml", ROOT / "configs" / "mil" / "comel_two_organ_task.yaml"]


@pytest.fixture(scope="module")
def patch_root(shared_dir: Path) -> Path:
    root = shared_dir / "patch_data"
    for sub in (two_organ.LUNG_DIR, two_organ.ORAL_DIR):
        if not (root / sub / "manifest.csv").is_file():
            pytest.skip(f"{root / sub}/manifest.csv is missing")
    return root


@pytest.fixture(scope="module")
def splits(patch_root: Path) -> dict[str, list]:
    return two_organ.stream_splits(patch_root, seed=0)


@pytest.fixture(scope="module")
def oral_rows(patch_root: Path) -> dict[str, dict[str, str]]:
    with (patch_root / two_organ.ORAL_DIR / "manifest.csv").open(newline="") as fh:
        return {f"{two_organ.ORAL_DIR}/{r['path']}": r for r in csv.DictReader(fh)}


def test_oral_table_reads_the_real_manifest(patch_root):
    tiles = oral_rahman.load_oral_tiles(patch_root / two_organ.ORAL_DIR)
    assert len(tiles) == 1190
    assert {lab: sum(t.label == lab for t in tiles) for lab in oral_rahman.ORAL_CLASSES} == {
        "oral_normal": 273,
        "oral_scc": 917,
    }


def test_split_units_merge_blocks_linked_by_a_duplicate_group():
    rows = [
        {"seq_block10": "a_b000", "group": "g1"},
        {"seq_block10": "a_b003", "group": "g1"},  # a duplicate pair straddling two blocks
        {"seq_block10": "a_b003", "group": "g2"},
        {"seq_block10": "a_b005", "group": "g3"},
    ]
    assert oral_rahman.split_units(rows) == {"a_b000": "a_b000", "a_b003": "a_b000", "a_b005": "a_b005"}


def test_no_seq_block_or_duplicate_group_in_two_splits(splits, oral_rows):
    for key in ("seq_block10", "group"):
        where: dict[str, set[str]] = {}
        for split, tiles in splits.items():
            for t in tiles:
                if t.rel in oral_rows:
                    where.setdefault(oral_rows[t.rel][key], set()).add(split)
        assert where, key
        assert all(len(s) == 1 for s in where.values()), key
    lung_groups: dict[str, set[str]] = {}
    for split, tiles in splits.items():
        for t in tiles:
            if t.rel.startswith(two_organ.LUNG_DIR):
                lung_groups.setdefault(t.group_id, set()).add(split)
    assert all(len(s) == 1 for s in lung_groups.values())
    # every split holds every class (val/test oral normal is the scarce pool)
    for tiles in splits.values():
        assert {t.label for t in tiles} == set(two_organ.CLASSES)


def test_no_tile_in_two_classes_and_no_aca(splits):
    label_of: dict[str, set[str]] = {}
    for tiles in splits.values():
        for t in tiles:
            label_of.setdefault(t.rel, set()).add(t.label)
    assert all(len(v) == 1 for v in label_of.values())
    assert not any("lung_aca" in rel for rel in label_of)
    assert sum(len(v) for v in splits.values()) == len(label_of) == 995 + 992 + 1190


def test_labels_are_offset_by_two_per_task():
    for t, task in enumerate(two_organ.TASKS):
        assert two_organ.LABEL_SPACE[task.normal] == 2 * t
        assert two_organ.LABEL_SPACE[task.tumour] == 2 * t + 1
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.classes == list(two_organ.CLASSES)
        assert [cfg.task_classes(t) for t in range(len(cfg.tasks))] == [[0, 1], [2, 3]]
        assert cfg.model == "gdat"


@pytest.fixture(scope="module")
def small_build(patch_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = BagSpec(grid=4, bags_per_class=(3, 2, 3))
    out = tmp_path_factory.mktemp("two_organ")
    return two_organ.build_two_organ_bags(patch_root, out, spec, "colour", seed=0, encode_all=False)


def test_small_build_is_accepted_by_the_continual_runner(small_build, tmp_path):
    for path in CONFIGS:
        cfg = load_config(path, manifest=str(small_build), out_dir=str(tmp_path))
        prepared = prepare_bags(cfg)
        assert len(prepared.records) == 2 * 2 * (3 + 2 + 3)
        assert {r.label for r in prepared.records} == set(two_organ.CLASSES)
    meta = json.loads((small_build.parent / "bags.json").read_text())
    assert meta["label_space"] == two_organ.LABEL_SPACE
    assert meta["task_pools"]["oral"] == {"normal": "oral_normal", "tumour": "oral_scc"}
    for r in prepared.records:
        with h5py.File(r.path, "r") as f:
            rels = [p.decode() for p in f["tile_paths"][:]]
            inst = f["instance_labels"][:]
            assert f.attrs["label_index"] == two_organ.LABEL_SPACE[r.label]
        assert all(
            rel.startswith(f"{two_organ.LUNG_DIR if r.task == 'lung' else two_organ.ORAL_DIR}/") for rel in rels
        )
        assert inst.any() == r.label.endswith("_scc")


def test_the_opt_in_lung_aca_task_adds_a_fifth_label_and_leaves_the_others(patch_root, tmp_path):
    spec = BagSpec(grid=4, bags_per_class=(2, 1, 2))
    manifest = two_organ.build_two_organ_bags(patch_root, tmp_path, spec, "colour", seed=0, encode_all=False,
                                              with_lung_aca=True)  # fmt: skip
    meta = json.loads((manifest.parent / "bags.json").read_text())
    assert meta["label_space"] == {**two_organ.LABEL_SPACE, "lung_aca": 4}
    assert meta["task_pools"]["lung_aca"] == {"normal": "lung_normal", "tumour": "lung_aca"}
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["task"] for r in rows} == {"lung", "oral", "lung_aca"}
    assert {r["label"] for r in rows if r["task"] == "lung_aca"} == {"lung_normal", "lung_aca"}
    tiles = two_organ.load_stream_tiles(patch_root, with_lung_aca=True)
    assert sum(t.label == "lung_aca" for t in tiles) == 972


def test_colour_baseline_reads_the_stream_label_space(small_build):
    base = colour_centroid_baseline(small_build)
    assert {"lung/bag_acc", "oral/bag_acc", "4class/bag_acc"} <= set(base)
    assert base["4class/n_test_bags"] == 2 * 2 * 3


def test_densenet_features_use_the_capricorn_weights_on_unit_range_inputs(patch_root, tmp_path):
    """Four tiles through the bag builder's feature path equal timm's densenet121 on x / 255 (mean 0, std 1)."""
    timm = pytest.importorskip("timm")
    import torch
    from safetensors.torch import load_file

    from pathopeft.datasets.lc25000 import read_tile
    from pathopeft.mil.tile_features import tile_features

    weights = two_organ.default_weights(patch_root)
    if not weights.is_file():
        pytest.skip(f"{weights} is missing")
    tiles = [t for t in two_organ.load_stream_tiles(patch_root) if t.label in ("lung_scc", "oral_normal")][::700][:4]
    feats, info = tile_features(
        tiles, two_organ.DENSENET, tmp_path, weights=weights, model_kwargs=two_organ.DENSENET_KWARGS, batch_size=4
    )
    assert feats.shape == (len(tiles), 1024)
    assert not info["random_init"]
    model = timm.create_model("densenet121", num_classes=0, pretrained=False)
    model.load_state_dict(
        {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}, strict=False
    )
    x = torch.from_numpy(np.stack([read_tile(t.path) for t in tiles])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)
