"""MIL bags from real LC25000 lung tiles: group splits, witness blobs, labels, H5 contract, determinism, baseline."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as connected_components

from pathopeft.datasets import lc25000 as mb
from pathopeft.mil import tile_features
from pathopeft.mil.data import BagRecord, read_bag_manifest
from pathopeft.wsi import h5io
from tests._tiny import TINY_VIT

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def lc_root(shared_dir: Path) -> Path:
    root = shared_dir / "patch_data" / "lc25000_lung224"
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"{root}/manifest.csv is missing")
    return root


@pytest.fixture(scope="module")
def tiles(lc_root: Path) -> list[mb.TileRecord]:
    return mb.load_tile_table(lc_root)


@pytest.fixture(scope="module")
def splits(tiles: list[mb.TileRecord]) -> dict[str, list[mb.TileRecord]]:
    return mb.split_groups(tiles, seed=0)


@pytest.fixture(scope="module")
def built(lc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A colour-feature bag set large enough for the baseline: 4/4/16 bags per (task, class, split)."""
    spec = mb.BagSpec(grid=8, bags_per_class=(4, 4, 16))
    return mb.build_bags(lc_root, tmp_path_factory.mktemp("bags"), spec, "colour", seed=0)


def _bag_rows(manifest: Path) -> list[BagRecord]:
    return read_bag_manifest(manifest, extra_columns=mb.EXTRA_COLUMNS)


def _tile_label(tiles: list[mb.TileRecord]) -> dict[str, str]:
    return {t.rel: t.label for t in tiles}


# ------------------------------------------------------------------------------------------------- tile table


def test_tile_table_reads_the_real_manifest(tiles):
    assert len(tiles) == 2959
    counts = {lab: sum(t.label == lab for t in tiles) for lab in mb.LABEL_SPACE}
    assert counts == {"benign": 995, "aca": 972, "scc": 992}
    assert all(t.path.is_file() for t in tiles[:20])


def test_tile_table_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv"):
        mb.load_tile_table(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,group_id\na.jpeg,g0\n")
    with pytest.raises(ValueError, match=r"manifest\.csv: missing column.*class"):
        mb.load_tile_table(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,class,group_id\na.jpeg,lung_n,g0\nb.jpeg,colon_aca,g1\n")
    with pytest.raises(ValueError, match=r"manifest\.csv:3: unknown class 'colon_aca'"):
        mb.load_tile_table(tmp_path, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv:2: tile .*a\.jpeg not found"):
        mb.load_tile_table(tmp_path)


# ------------------------------------------------------------------------------------------------------ splits


def test_group_split_has_no_leakage_and_is_deterministic(tiles, splits):
    groups = {s: {t.group_id for t in ts} for s, ts in splits.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sorted(t.rel for ts in splits.values() for t in ts) == sorted(t.rel for t in tiles)
    for lab in mb.LABEL_SPACE:  # stratified: every class ≈ 60/20/20 of its groups
        n = {s: len({t.group_id for t in ts if t.label == lab}) for s, ts in splits.items()}
        total = sum(n.values())
        assert abs(n["train"] - 0.6 * total) <= 1
        assert abs(n["val"] - 0.2 * total) <= 1
    again = mb.split_groups(list(reversed(tiles)), seed=0)  # input order does not matter
    assert {s: [t.rel for t in ts] for s, ts in again.items()} == {s: [t.rel for t in ts] for s, ts in splits.items()}
    other = mb.split_groups(tiles, seed=1)
    assert {t.group_id for t in other["test"]} != groups["test"]


def test_split_rejects_bad_fractions_and_mixed_groups():
    a = mb.TileRecord(Path("a"), "benign", "g", "a")
    b = mb.TileRecord(Path("b"), "aca", "g", "b")
    with pytest.raises(ValueError, match="summing to 1"):
        mb.split_groups([a], fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="mixes classes"):
        mb.split_groups([a, b])


# -------------------------------------------------------------------------------------------------------- bags


def test_spec_presets_and_validation():
    assert mb.BagSpec().n_instances == 64
    assert mb.BagSpec().witness_counts() == (4, 19)  # 5–30 % of 64
    assert mb.BagSpec.hard().witness_counts() == (1, 3)  # 1–5 % of 64, at least one tile
    assert mb.BagSpec(grid=16).n_instances == 256
    with pytest.raises(ValueError, match="grid"):
        mb.BagSpec(grid=17)
    with pytest.raises(ValueError, match="larger grid"):
        mb.BagSpec.hard(grid=4)  # 1 of 16 tiles is already 6 %


def test_grow_blob_is_one_4_connected_region():
    rng = np.random.default_rng(0)
    for grid in (1, 3, 8, 16):
        for n in sorted({1, min(2, grid * grid), grid, grid * grid // 3 + 1, grid * grid}):
            mask = mb.grow_blob(grid, n, rng)
            assert mask.sum() == n
            assert connected_components(mask, connectivity=1).max() == 1


@pytest.mark.parametrize(
    "spec", [mb.BagSpec(bags_per_class=4), mb.BagSpec.hard(bags_per_class=4)], ids=["default", "hard"]
)
def test_bags_witness_rate_blob_and_split_purity(splits, spec):
    lo, hi = spec.witness_range
    rels = {s: {t.rel for t in ts} for s, ts in splits.items()}
    bags = mb.make_bags(splits, spec, seed=0)
    assert len(bags) == len(mb.TASKS) * len(mb.SPLITS) * 2 * 4
    for bag in bags:
        assert len(bag.tiles) == len(bag.instance_labels) == 64
        assert {t.rel for t in bag.tiles} <= rels[bag.split]  # tiles from the bag's split only
        assert len({t.rel for t in bag.tiles}) == 64  # pools are large enough: no repeats within a bag
        for t, y in zip(bag.tiles, bag.instance_labels, strict=True):
            assert t.label == (bag.task if y else "benign")
        if bag.label == "benign":
            assert bag.n_witness == 0
        else:
            assert bag.label == bag.task
            assert bag.n_witness >= 1
            assert lo <= bag.witness_rate <= hi
            mask = bag.instance_labels.reshape(bag.grid, bag.grid).astype(bool)
            assert connected_components(mask, connectivity=1).max() == 1


def test_bag_rng_is_per_bag(splits):
    """More bags only append: the first bags of every cell stay the same."""
    few = mb.make_bags(splits, mb.BagSpec(bags_per_class=2), seed=3)
    more = {b.slide_id: b for b in mb.make_bags(splits, mb.BagSpec(bags_per_class=3), seed=3)}
    for b in few:
        assert [t.rel for t in more[b.slide_id].tiles] == [t.rel for t in b.tiles]


# -------------------------------------------------------------------------------------------- files on disk


def test_h5_files_carry_features_coords_and_instance_labels(built, tiles, lc_root):
    rows = _bag_rows(built)
    assert len(rows) == 2 * 2 * (4 + 4 + 16)
    label_of = _tile_label(tiles)
    for r in rows[:: len(rows) // 12]:
        feats, coords = h5io.read_features(r.path)
        assert feats.shape == (64, mb.COLOUR_DIM)
        assert feats.dtype == np.float32
        rows_, cols_ = np.divmod(np.arange(64), 8)
        np.testing.assert_array_equal(coords, np.stack([cols_ * 224, rows_ * 224], 1))
        assert coords.dtype == np.int64
        with h5py.File(r.path, "r") as f:
            inst = f["instance_labels"][:]
            paths = [p.decode() for p in f["tile_paths"][:]]
            assert f["coords"].attrs["patch_size"] == 224
            assert f["coords"].attrs["patch_level"] == 0
            np.testing.assert_array_equal(f["coords"].attrs["downsample"], [1.0, 1.0])
            assert f.attrs["encoder"] == "colour"
            assert f.attrs["label"] == r.label
        assert inst.dtype == np.int8
        assert inst.shape == (64,)
        # the tile at each coordinate has the class its instance label says
        assert [label_of[p] != "benign" for p in paths] == inst.astype(bool).tolist()
        assert float(r.extra["witness_rate"]) == pytest.approx(inst.mean(), abs=1e-6)
        # features are the tile's own colour descriptor, looked up per bag
        np.testing.assert_allclose(feats[5], mb.colour_features(mb.read_tile(lc_root / paths[5])), rtol=1e-6)


def test_manifest_and_thumbnails(built, lc_root):
    with built.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == mb.MANIFEST_COLUMNS
        rows = list(reader)
    assert not Path(rows[0]["path"]).is_absolute()  # relative to the CSV
    assert {r["task"] for r in rows} == set(mb.TASKS)
    assert {r["label"] for r in rows} == {"benign", "aca", "scc"}
    pos = next(r for r in rows if r["label"] != "benign")
    thumb = np.asarray(Image.open(built.parent / pos["thumbnail"]))
    assert thumb.shape == (8 * 28, 8 * 28, 3)
    with h5py.File(built.parent / pos["path"], "r") as f:
        paths = [p.decode() for p in f["tile_paths"][:]]
    tile9 = np.asarray(Image.fromarray(mb.read_tile(lc_root / paths[9])).resize((28, 28), Image.Resampling.BOX))
    np.testing.assert_array_equal(thumb[28:56, 28:56], tile9)  # instance 9 = row 1, column 1


def test_same_seed_same_bags_and_cached_rerun(lc_root, tmp_path, monkeypatch):
    spec = mb.BagSpec(grid=4, bags_per_class=1)
    a = mb.build_bags(lc_root, tmp_path / "a", spec, "colour", seed=7)
    b = mb.build_bags(lc_root, tmp_path / "b", spec, "colour", seed=7)
    assert a.read_bytes() == b.read_bytes()
    for r_a, r_b in zip(_bag_rows(a), _bag_rows(b), strict=True):
        np.testing.assert_array_equal(h5io.read_features(r_a.path)[0], h5io.read_features(r_b.path)[0])
    assert len(list((tmp_path / "a").glob("tile_features_*.h5"))) == 1
    c = mb.build_bags(lc_root, tmp_path / "c", spec, "colour", seed=8)
    assert c.read_bytes() != a.read_bytes()

    def boom(*_args: object) -> None:
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(tile_features, "colour_features", boom)
    assert mb.build_bags(lc_root, tmp_path / "a", spec, "colour", seed=7).read_bytes() == b.read_bytes()


def test_timm_features_random_init_is_seeded_and_announced(lc_root, tmp_path, caplog):
    kw = dict(TINY_VIT)
    arch = kw.pop("name")
    spec = mb.BagSpec(grid=2, bags_per_class=1)
    with caplog.at_level("WARNING"):
        a = mb.build_bags(lc_root, tmp_path / "a", spec, f"timm:{arch}", seed=0, model_kwargs=kw, batch_size=16)
    assert "RANDOM WEIGHTS" in caplog.text
    b = mb.build_bags(lc_root, tmp_path / "b", spec, f"timm:{arch}", seed=0, model_kwargs=kw, batch_size=16)
    row_a, row_b = _bag_rows(a)[0], _bag_rows(b)[0]
    fa, fb = h5io.read_features(row_a.path)[0], h5io.read_features(row_b.path)[0]
    assert fa.shape == (4, kw["embed_dim"])
    np.testing.assert_array_equal(fa, fb)
    with h5py.File(row_a.path, "r") as f:
        assert f.attrs["encoder"] == f"timm:{arch}"
        assert bool(f.attrs["random_init"])
    # the baseline recomputes colour descriptors from the images when the bags hold other features
    assert set(mb.colour_centroid_baseline(a)) >= {"aca/bag_acc", "scc/bag_acc", "3class/bag_acc"}


def test_colour_baseline_beats_0_9_on_tumour_vs_benign(built):
    result = mb.colour_centroid_baseline(built)
    assert result["aca/n_test_bags"] == 32
    assert result["aca/bag_acc"] > 0.9
    assert result["scc/bag_acc"] > 0.9
    assert min(result["aca/bag_auc"], result["scc/bag_auc"]) > 0.95
    assert result["aca/tile_acc"] > 0.9
    assert 0 <= result["3class/bag_acc"] <= 1
