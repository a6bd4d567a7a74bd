"""Full-image inference: the one tiling path (``predict_image``) agrees with the dataset's eval tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pathopeft.seg.compare import predict_full
from pathopeft.seg.data import SegDataset, SegRecord
from pathopeft.seg.model import SegModel
from pathopeft.seg.predict import predict_image
from pathopeft.seg.tiling import stitch
from tests.seg.test_data import squares_mask, write_pair


@pytest.mark.parametrize("stride", [None, 32, 20])
def test_predict_full_equals_stitching_the_dataset_tiles(tmp_path: Path, stride: int | None) -> None:
    torch.manual_seed(0)
    model = SegModel("test_resnet", n_classes=2, freeze_encoder=True).eval()
    rng = np.random.default_rng(0)
    records = []
    for name, size in [("big", (80, 100)), ("small", (20, 45))]:  # "small" is below the crop: padded
        ip, mp = write_pair(tmp_path, name, rng.integers(0, 256, (*size, 3), dtype=np.uint8), squares_mask(*size))
        records.append(SegRecord(name, ip, mp, "test"))
    ds = SegDataset(records, n_classes=2, crop=32, stride=stride)

    with torch.no_grad():
        tiles: dict[int, list] = {}
        for i in range(len(ds)):
            item = ds[i]
            p = torch.softmax(model(item["image"][None]), dim=1)[0]
            tiles.setdefault(item["index"], []).append((p, item["y"], item["x"]))
    expected = {i: stitch(t, ds.image_size(i)) for i, t in tiles.items()}

    got = predict_full(model, ds, batch=7)
    assert got.keys() == expected.keys()
    for i in got:
        assert got[i].shape == (2, *ds.image_size(i))
        torch.testing.assert_close(got[i], expected[i], atol=1e-5, rtol=1e-5)
    # and predict_image on a raw image is the same function the CLI's `seg predict` uses
    torch.testing.assert_close(predict_image(model, ds.load(0)[0], 32, ds.stride), expected[0], atol=1e-5, rtol=1e-5)
