"""Segmentation data layer: augmentation alignment, tiling/stitching, input errors, the shared MoNuSeg/GlaS sets."""

from __future__ import annotations

import csv
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pathopeft.datasets.glas import write_glas_manifest
from pathopeft.datasets.monuseg import write_monuseg_manifest
from pathopeft.seg.data import (
    SegDataError,
    SegDataModule,
    SegDataset,
    SegRecord,
    read_image,
    read_mask,
    read_seg_manifest,
    split_train_val,
    train_transforms,
)
from pathopeft.seg.tiling import stitch, tile_starts

# ------------------------------------------------------------------------------------------ helpers


def squares_mask(h: int, w: int, seed: int = 0, n: int = 6, value: int = 1) -> np.ndarray:
    """A few random filled squares (label ``value``) on background 0."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(n):
        s = int(rng.integers(h // 12, h // 5))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        mask[y : y + s, x : x + s] = value
    return mask


def red_is_mask(mask: np.ndarray) -> np.ndarray:
    """RGB image whose red channel is 255·(mask > 0): a label you can read back from the pixels."""
    img = np.empty((*mask.shape, 3), np.uint8)
    img[..., 0] = 255 * (mask > 0)
    img[..., 1], img[..., 2] = 60, 90
    return img


def write_pair(folder: Path, name: str, img: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ip, mp = folder / f"{name}.png", folder / f"{name}_mask.png"
    Image.fromarray(img).save(ip)
    Image.fromarray(mask).save(mp)
    return ip, mp


def write_csv(path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def synthetic_set(tmp_path: Path, n: int, size: tuple[int, int] = (80, 96), splits: list[str] | None = None) -> Path:
    """``n`` image/mask pairs (mask {0, 255}) and their manifest, with relative paths."""
    rows = []
    for i in range(n):
        mask = squares_mask(*size, seed=i) * 255
        write_pair(tmp_path / "data", f"im{i}", red_is_mask(mask), mask)
        split = splits[i] if splits else "train"
        rows.append({"image": f"data/im{i}.png", "mask": f"data/im{i}_mask.png", "split": split})
    return write_csv(tmp_path / "seg.csv", rows)


# ------------------------------------------------------------------------------------------ augmentation


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("strength", ["default", "light"])
def test_augmentation_keeps_image_and_mask_aligned(strength: str) -> None:
    mask = squares_mask(160, 160, seed=1)
    img = red_is_mask(mask)
    aug = train_transforms(128, strength)
    aug.set_random_seed(0)
    agree, ious = [], []
    for _ in range(120):
        out = aug(image=img, mask=mask)
        m = out["mask"]
        assert out["image"].shape == (128, 128, 3)
        assert m.shape == (128, 128)
        assert set(np.unique(m)) <= {0, 1}, "mask values changed (colour jitter or linear interpolation hit it)"
        red = out["image"][..., 0] > 128
        agree.append(float((red == (m == 1)).mean()))
        ious.append(_iou(red, m == 1))
    # elastic/affine resampling blurs the image edge by a pixel or so: allow a thin border band, nothing more
    assert min(agree) >= 0.98, f"worst pixel agreement {min(agree):.4f}"
    assert min(ious) >= 0.9, f"worst IoU {min(ious):.3f}"

    # the same check has teeth: geometry drawn independently for image and mask fails it
    drift = []
    for _ in range(60):
        a, b = aug(image=img, mask=mask), aug(image=img, mask=mask)
        drift.append(_iou(a["image"][..., 0] > 128, b["mask"] == 1))
    assert np.mean(drift) < 0.8


def test_mask_is_resampled_nearest_never_blended() -> None:
    mask = squares_mask(160, 160, seed=2, value=4)  # a 0→4 edge interpolated linearly would create 1, 2, 3
    aug = train_transforms(128, "default")
    aug.set_random_seed(1)
    for _ in range(60):
        assert set(np.unique(aug(image=red_is_mask(mask), mask=mask)["mask"])) <= {0, 4}


def test_colour_jitter_is_image_only() -> None:
    aug = train_transforms(64, "default")
    colour = [t for t in aug.transforms if isinstance(t, A.ImageOnlyTransform)]
    assert len(colour) >= 3  # stain, HSV, brightness/contrast (and blur)
    for t in colour:
        t.p = 1.0  # fire every time
    only_colour = A.Compose(colour)
    only_colour.set_random_seed(0)
    mask = squares_mask(64, 64, seed=3)
    img = red_is_mask(mask)
    img[..., 1] = np.linspace(40, 200, 64, dtype=np.uint8)  # some texture for the stain model
    changed = 0
    for _ in range(20):
        out = only_colour(image=img, mask=mask)
        np.testing.assert_array_equal(out["mask"], mask)
        changed += int(not np.array_equal(out["image"], img))
    assert changed >= 15


# ------------------------------------------------------------------------------------------ tiles & stitching


def test_tile_starts_flush_with_border() -> None:
    assert tile_starts(1000, 256, 128) == [0, 128, 256, 384, 512, 640, 744]
    assert tile_starts(256, 256, 128) == [0]
    assert tile_starts(100, 256, 128) == [0]
    assert tile_starts(300, 256, 256) == [0, 44]


@pytest.mark.parametrize(("size", "crop", "stride"), [((100, 137), 32, 20), ((20, 25), 32, None), ((64, 64), 32, 32)])
def test_eval_tiles_cover_image_and_stitch_identity(
    tmp_path: Path, size: tuple[int, int], crop: int, stride: int | None
) -> None:
    mask = squares_mask(*size, seed=4, value=1)
    mask[squares_mask(*size, seed=5) > 0] = 2
    img = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    ip, mp = write_pair(tmp_path, "a", img, mask)
    ds = SegDataset([SegRecord("a", ip, mp, "test")], n_classes=3, mask_mode="index", crop=crop, stride=stride)
    h, w = size
    cover = np.zeros(size, int)
    tiles = []
    for i in range(len(ds)):
        item = ds[i]
        y, x = item["y"], item["x"]
        assert item["image"].shape == (3, crop, crop)
        assert item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.int64
        assert (item["index"], item["height"], item["width"]) == (0, h, w)
        vh, vw = min(crop, h - y), min(crop, w - x)
        # the tile is exactly that window of the source (no resampling, no colour change)
        np.testing.assert_array_equal(item["mask"][:vh, :vw].numpy(), mask[y : y + vh, x : x + vw])
        expect = torch.from_numpy(img[y : y + vh, x : x + vw]).permute(2, 0, 1).float() / 255
        assert torch.equal(item["image"][:, :vh, :vw], expect)
        cover[y : y + vh, x : x + vw] += 1
        tiles.append((torch.nn.functional.one_hot(item["mask"], 3).permute(2, 0, 1).float(), y, x))
    assert cover.min() >= 1
    assert max(t[1] for t in tiles) == max(0, h - crop)  # last row/column of tiles flush with the border
    assert max(t[2] for t in tiles) == max(0, w - crop)
    stitched = stitch(tiles, ds.image_size(0))
    full = ds.full_mask(0)
    assert torch.equal(stitched, torch.nn.functional.one_hot(full, 3).permute(2, 0, 1).float())
    assert torch.equal(stitched.argmax(0), full)


def test_stitch_averages_overlaps_and_rejects_gaps() -> None:
    ones, threes = torch.ones(1, 4, 4), torch.full((1, 4, 4), 3.0)
    out = stitch([(ones, 0, 0), (threes, 0, 2)], (4, 6))
    assert torch.equal(out[0, :, :2], torch.ones(4, 2))
    assert torch.equal(out[0, :, 2:4], torch.full((4, 2), 2.0))
    assert torch.equal(out[0, :, 4:], torch.full((4, 2), 3.0))
    with pytest.raises(ValueError, match="uncovered"):
        stitch([(ones, 0, 0)], (4, 6))


def test_train_crops_are_windows_of_the_image(tmp_path: Path) -> None:
    mask = squares_mask(90, 70, seed=6)
    ip, mp = write_pair(tmp_path, "a", red_is_mask(mask), mask * 255)
    rec = SegRecord("a", ip, mp, "train")
    ds = SegDataset([rec], n_classes=2, crop=48, train=True, samples_per_epoch=10)
    assert len(ds) == 10
    for i in range(10):
        item = ds[i]
        y, x = item["y"], item["x"]
        assert item["image"].shape == (3, 48, 48)
        assert float(item["image"].min()) >= 0.0
        assert float(item["image"].max()) <= 1.0
        np.testing.assert_array_equal(item["mask"].numpy(), mask[y : y + 48, x : x + 48])
    small = SegDataset([rec], n_classes=2, crop=128, train=True, aug=train_transforms(128))
    item = small[0]  # 90×70 image reflect-padded to 128×128
    assert item["image"].shape == (3, 128, 128)
    assert item["mask"].shape == (128, 128)
    assert set(item["mask"].unique().tolist()) <= {0, 1}


def test_random_crops_repeat_under_seed_and_differ_across_workers(tmp_path: Path) -> None:
    recs = read_seg_manifest(synthetic_set(tmp_path, 1, size=(200, 200)))

    def origins(ds: SegDataset, **kw: int) -> list[tuple[int, int]]:
        return [(int(b["y"]), int(b["x"])) for b in DataLoader(ds, batch_size=None, **kw)]

    torch.manual_seed(7)
    a = origins(SegDataset(recs, 2, crop=32, train=True, samples_per_epoch=8))
    torch.manual_seed(7)
    b = origins(SegDataset(recs, 2, crop=32, train=True, samples_per_epoch=8))
    assert a == b
    w = origins(SegDataset(recs, 2, crop=32, train=True, samples_per_epoch=8), num_workers=2)
    assert w[0::2] != w[1::2], "both workers drew the same crops"


# ------------------------------------------------------------------------------------------ decoding


def test_image_modes_become_rgb_uint8(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.dstack([np.full((6, 8, 3), 7, np.uint8), np.zeros((6, 8), np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "t.tif", np.full((6, 8, 3), 9, np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "p.tif", np.full((3, 6, 8), 5, np.uint8), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "w.tif", np.full((6, 8), 65535, np.uint16))
    g = read_image(tmp_path / "g.png")
    assert g.shape == (6, 8, 3)
    assert g.dtype == np.uint8
    assert np.array_equal(g[..., 2], grey)
    assert np.array_equal(read_image(tmp_path / "a.png"), np.full((6, 8, 3), 7, np.uint8))
    assert np.array_equal(read_image(tmp_path / "t.tif"), np.full((6, 8, 3), 9, np.uint8))
    assert np.array_equal(read_image(tmp_path / "p.tif"), np.full((6, 8, 3), 5, np.uint8))
    assert np.array_equal(read_image(tmp_path / "w.tif"), np.full((6, 8, 3), 255, np.uint8))
    tifffile.imwrite(tmp_path / "m.tif", np.array([[0, 3], [1, 2]], np.uint16))
    assert read_mask(tmp_path / "m.tif").tolist() == [[0, 3], [1, 2]]


# ------------------------------------------------------------------------------------------ errors


def test_missing_file_names_manifest_line_and_file(tmp_path: Path) -> None:
    csv_path = synthetic_set(tmp_path, 2)
    (tmp_path / "data" / "im1_mask.png").unlink()
    with pytest.raises(SegDataError, match=r"seg\.csv:3: mask file .*im1_mask\.png not found"):
        read_seg_manifest(csv_path)


def test_missing_column_names_file(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "nosplit.csv", [{"image": "a.png", "mask": "b.png"}])
    with pytest.raises(SegDataError, match=r"nosplit\.csv: missing column\(s\) \['split'\]"):
        read_seg_manifest(csv_path)


def test_duplicate_id_bad_split_and_jpeg_mask(tmp_path: Path) -> None:
    synthetic_set(tmp_path, 1)
    row = {"id": "x", "image": "data/im0.png", "mask": "data/im0_mask.png", "split": "train"}
    with pytest.raises(SegDataError, match=r"dup\.csv:3: duplicate id 'x'"):
        read_seg_manifest(write_csv(tmp_path / "dup.csv", [row, row]))
    with pytest.raises(SegDataError, match=r"split\.csv:2: split 'holdout'"):
        read_seg_manifest(write_csv(tmp_path / "split.csv", [{**row, "split": "holdout"}]))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / "m.jpg")
    with pytest.raises(SegDataError, match=r"jpg\.csv:2: mask file .*m\.jpg must be one of"):
        read_seg_manifest(write_csv(tmp_path / "jpg.csv", [{**row, "mask": "data/m.jpg"}]))


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    ip, _ = write_pair(tmp_path, "a", np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.uint8))
    _, mp = write_pair(tmp_path, "b", np.zeros((40, 48, 3), np.uint8), np.zeros((40, 48), np.uint8))
    with pytest.raises(SegDataError, match=r"a\.png is 40×50 .* but mask .*b_mask\.png is 40×48"):
        SegDataset([SegRecord("a", ip, mp, "train")], n_classes=2)


def test_mask_values_outside_classes_name_file_and_values(tmp_path: Path) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[:4] = 2
    mask[-4:] = 7
    ip, mp = write_pair(tmp_path, "a", np.zeros((32, 32, 3), np.uint8), mask)
    ds = SegDataset([SegRecord("a", ip, mp, "test")], n_classes=3, mask_mode="index", crop=32)
    with pytest.raises(SegDataError, match=r"a_mask\.png: mask values \[7\] .* outside the 3 classes"):
        ds[0]
    ok = SegDataset([SegRecord("a", ip, mp, "test")], n_classes=2, mask_mode="binary", crop=32)
    assert set(ok[0]["mask"].unique().tolist()) == {0, 1}
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(SegDataError, match=r"colour\.png: colour mask"):
        read_mask(tmp_path / "colour.png")


# ------------------------------------------------------------------------------------------ splits & datamodule


def test_val_split_is_by_image_seeded_and_respects_groups(tmp_path: Path) -> None:
    recs = [SegRecord(f"r{i}", Path(f"{i}.png"), Path(f"{i}m.png"), "train", group=f"p{i // 2}") for i in range(10)]
    tr, va, te = split_train_val(recs, 0.2, seed=3)
    assert (tr, va, te) == split_train_val(recs, 0.2, seed=3)
    assert len(va) == 2
    assert te == []
    assert {r.group for r in va}.isdisjoint({r.group for r in tr})  # a patient's images stay together
    assert len({r.group for r in va}) == 1
    explicit = [*recs[:8], *(SegRecord(r.id, r.image, r.mask, "val") for r in recs[8:])]
    assert [r.id for r in split_train_val(explicit, 0.5)[1]] == ["r8", "r9"]


def test_datamodule_crops_tiles_and_held_out_images(tmp_path: Path) -> None:
    csv_path = synthetic_set(tmp_path, 7, size=(80, 96), splits=["train"] * 5 + ["test"] * 2)
    dm = SegDataModule(str(csv_path), crop=32, batch_size=4, val_fraction=0.2, seed=0)
    dm.setup("fit")
    assert dm.train_set is not None
    assert dm.val_set is not None
    assert (len(dm.train_records), len(dm.val_records), len(dm.test_records)) == (4, 1, 2)
    assert {r.id for r in dm.train_records}.isdisjoint(r.id for r in dm.val_records)
    assert len(dm.train_set) == 8 * 4  # default: 8 random crops per train image per epoch
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 32, 32)
    assert batch["mask"].dtype == torch.int64
    assert set(batch) == {"image", "mask", "index", "y", "x", "height", "width"}
    val_tiles = [t for b in dm.val_dataloader() for t in b["y"].tolist()]
    assert len(val_tiles) == len(tile_starts(80, 32, 16)) * len(tile_starts(96, 32, 16))
    dm.setup("test")
    assert sum(len(b["index"]) for b in dm.test_dataloader()) == 2 * len(val_tiles)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.shared
def test_monuseg_manifest_and_samples(shared_dir: Path, tmp_path: Path) -> None:
    root = shared_dir / "data" / "monuseg"
    if not root.is_dir():
        pytest.skip(f"{root} is missing")
    out = write_monuseg_manifest(root, tmp_path / "manifests" / "monuseg.csv")
    first = next(csv.DictReader(out.open()))
    assert not Path(first["image"]).is_absolute()  # relative to the CSV, pointing outside it
    recs = read_seg_manifest(out)
    assert sum(r.split == "train" for r in recs) == 30
    assert sum(r.split == "test" for r in recs) == 14
    assert len({r.group for r in recs}) == len(recs)
    raw = read_mask(recs[0].mask)
    assert set(np.unique(raw).tolist()) == {0, 255}
    train = SegDataset([r for r in recs if r.split == "train"][:2], 2, crop=256, train=True, aug=train_transforms(256))
    item = train[0]
    assert item["image"].shape == (3, 256, 256)
    assert item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0
    assert float(item["image"].max()) <= 1.0
    assert item["mask"].shape == (256, 256)
    assert item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= {0, 1}
    test = SegDataset([r for r in recs if r.split == "test"][:1], 2, crop=256)
    assert len(test) == 7 * 7  # 1000 px, stride 128: 0, 128, …, 640, 744
    frac = float(test.full_mask(0).float().mean())
    assert 0.02 < frac < 0.6  # nuclei cover a fraction of the tile, background the rest


@pytest.mark.shared
def test_glas_subset_reads(shared_dir: Path, tmp_path: Path) -> None:
    root = shared_dir / "data" / "glas_subset22"
    if not root.is_dir():
        pytest.skip(f"{root} is missing")
    recs = read_seg_manifest(write_glas_manifest(root, tmp_path / "glas.csv"))
    assert len(recs) == 22
    assert {r.split for r in recs} == {"test"}
    split = read_seg_manifest(write_glas_manifest(root, tmp_path / "g2.csv", {"testA": "train"}))
    assert sum(r.split == "train" for r in split) == 12
    ds = SegDataset(recs[:1], 2, crop=512)
    assert ds.image_size(0) == (522, 775)
    assert len(ds) == 2 * 3
    item = ds[0]
    assert item["image"].shape == (3, 512, 512)
    assert set(item["mask"].unique().tolist()) == {0, 1}
