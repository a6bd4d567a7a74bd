import h5py
import numpy as np
import pytest

from pathopeft.wsi import h5io
from pathopeft.wsi.tiling import tile_grid


def _grid():
    return tile_grid((2000, 1500), (1.0, 4.0), level0_mpp=0.25, target_mpp=0.5, tile_px=224)


def test_coords_attrs_superset_of_clam_and_trident():
    g = _grid()
    attrs = h5io.coords_attrs(g, "s1", ((2000, 1500), (500, 375)))
    clam = {
        "patch_size",
        "patch_level",
        "downsample",
        "downsampled_level_dim",
        "level_dim",
        "name",
        "custom_downsample",
    }
    trident = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name"}
    ours = {"target_mpp", "level0_mpp", "target_patch_size", "level0_width", "level0_height"}
    assert clam | trident | ours <= set(attrs)
    assert attrs["patch_level"] == 0
    assert attrs["patch_size"] == 448
    assert attrs["custom_downsample"] == pytest.approx(2.0)
    assert attrs["patch_size_level0"] == 448
    assert attrs["level0_magnification"] == pytest.approx(40)
    # TRIDENT reads patch_size * level0_mag / target_mag level-0 px: the magnification of the 448 px read
    assert attrs["target_magnification"] == pytest.approx(40)
    assert attrs["tile_magnification"] == pytest.approx(20)


def test_write_read_round_trip(tmp_path):
    g = _grid()
    meta = h5io.coords_attrs(g, "s1", ((2000, 1500), (500, 375)))
    feats = np.random.default_rng(0).normal(size=(len(g), 8)).astype(np.float32)
    h5io.write_features(tmp_path / "f.h5", feats, g.coords, meta, {"params_hash": "abc", "encoder": "vit"})
    f2, c2 = h5io.read_features(tmp_path / "f.h5")
    np.testing.assert_array_equal(f2, feats)
    np.testing.assert_array_equal(c2, g.coords)
    assert h5io.read_hash(tmp_path / "f.h5") == "abc"
    coords, attrs = h5io.read_coords(tmp_path / "f.h5")
    assert coords.dtype == np.int64
    assert attrs["name"] == "s1"
    with h5py.File(tmp_path / "f.h5") as f:
        assert f.attrs["encoder"] == "vit"
        assert "pathopeft_version" in f.attrs


def test_empty_slide_writes_empty_datasets(tmp_path):
    h5io.write_features(tmp_path / "e.h5", np.zeros((0, 16)), np.zeros((0, 2)), {"patch_size": 224}, {})
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["coords"].shape == (0, 2)
        assert f["features"].shape == (0, 16)
        assert f["coords"].dtype == np.int64


def test_mismatched_features_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"f\.h5: features"):
        h5io.write_features(tmp_path / "f.h5", np.zeros((3, 4)), np.zeros((2, 2)), {}, {})
    assert not (tmp_path / "f.h5").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """A crash while writing never leaves a final file (nor a temporary one)."""
    target = tmp_path / "p.h5"

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(h5py.AttributeManager, "__setitem__", boom)
    with pytest.raises(RuntimeError, match="boom"):
        h5io.write_patches(target, np.zeros((5, 2)), {"patch_size": 1}, {})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_h5_raises_disk_full_naming_the_file(tmp_path, monkeypatch):
    """ENOSPC reaches the caller as DiskFullError naming the file; no temporary is left behind."""
    import errno

    from pathopeft import io
    from pathopeft.errors import DiskFullError

    def full(tmp, data):
        tmp.write_bytes(data[: len(data) // 2])  # half a file on disk, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_all", full)
    with pytest.raises(DiskFullError, match=r"f\.h5: disk full"):
        h5io.write_features(tmp_path / "f.h5", np.zeros((3, 4)), np.zeros((3, 2)), {}, {})
    assert list(tmp_path.iterdir()) == []


def test_params_hash_is_stable_and_sensitive():
    a = h5io.params_hash({"x": 1, "y": [1, 2]})
    assert a == h5io.params_hash({"y": [1, 2], "x": 1})
    assert a != h5io.params_hash({"x": 2, "y": [1, 2]})


def test_read_hash_of_missing_file_is_none(tmp_path):
    assert h5io.read_hash(tmp_path / "nope.h5") is None
