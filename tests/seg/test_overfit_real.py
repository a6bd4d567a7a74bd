"""A real 4-image subset can be overfitted: the whole model/loss/data path learns (slow, real data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathopeft.datasets.glas import write_glas_manifest
from pathopeft.seg.data import decode_mask, read_image, read_mask, read_seg_manifest
from pathopeft.seg.model import SegModel
from pathopeft.seg.module import SegModule


@pytest.mark.slow
@pytest.mark.shared
def test_overfit_four_real_glas_crops(shared_dir, tmp_path):
    root = shared_dir / "data" / "glas_subset22"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    records = read_seg_manifest(write_glas_manifest(root, tmp_path / "glas.csv"))[:4]
    crops, masks = [], []
    for r in records:
        img, mask = read_image(r.image), decode_mask(read_mask(r.mask), 2, "binary", r.mask)
        y, x = (img.shape[0] - 96) // 2, (img.shape[1] - 96) // 2
        crops.append(torch.from_numpy(img[y : y + 96 : 2, x : x + 96 : 2].copy()).permute(2, 0, 1).float() / 255)
        masks.append(torch.from_numpy(mask[y : y + 96 : 2, x : x + 96 : 2].astype(np.int64)))
    batch = {"image": torch.stack(crops), "mask": torch.stack(masks)}
    assert 0.05 < batch["mask"].float().mean() < 0.95  # both classes present: Dice is meaningful
    torch.manual_seed(0)
    module = SegModule(SegModel("test_resnet", 2, adapter="full", freeze_encoder=False, decoder_channels=32), lr=3e-3)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt[0][0] if isinstance(opt, tuple) else opt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and leaves the other core alone
    module.train()
    dice = 0.0
    for step in range(300):
        opt.zero_grad()
        loss, logits = module.compute_loss(batch)
        loss.backward()
        opt.step()
        if step % 25 == 24:
            pred = logits.argmax(1)
            inter = ((pred == 1) & (batch["mask"] == 1)).sum().item()
            dice = 2 * inter / ((pred == 1).sum().item() + (batch["mask"] == 1).sum().item())
            if dice > 0.9:
                break
    torch.set_num_threads(threads)
    assert dice > 0.9, f"Dice {dice:.3f} after {step + 1} steps"
