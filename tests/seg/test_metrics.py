"""The one Dice/IoU convention (pathopeft.seg.metrics), used by training-time validation and seg compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathopeft.seg.metrics import DiceIoU, dice_iou


def _by_hand(pred: np.ndarray, target: np.ndarray, n_classes: int) -> tuple[float, float]:
    dices, ious = [], []
    for c in range(1, n_classes):
        p, g = pred == c, target == c
        inter, total, union = (p & g).sum(), p.sum() + g.sum(), (p | g).sum()
        dices.append(1.0 if total == 0 else 2 * inter / total)
        ious.append(1.0 if union == 0 else inter / union)
    return float(np.mean(dices)), float(np.mean(ious))


def test_absent_classes():
    empty = torch.zeros(8, 8, dtype=torch.long)
    assert dice_iou(empty, empty, 2) == (1.0, 1.0)  # nothing to find, nothing found
    spurious = empty.clone()
    spurious[2:4, 2:4] = 1
    assert dice_iou(spurious, empty, 2) == (0.0, 0.0)  # predicted where there is nothing
    assert dice_iou(empty, spurious, 2) == (0.0, 0.0)  # missed


@pytest.mark.parametrize("n_classes", [2, 4])
def test_matches_the_formula_and_averages_over_items(n_classes):
    rng = np.random.default_rng(0)
    scores = DiceIoU(n_classes)
    per_image = []
    for _ in range(5):
        pred = rng.integers(0, n_classes, (16, 16))
        target = rng.integers(0, n_classes, (16, 16))
        target[:, :8] = 0  # some classes absent in some images
        d, j = dice_iou(torch.from_numpy(pred), torch.from_numpy(target), n_classes)
        assert (d, j) == pytest.approx(_by_hand(pred, target, n_classes))
        per_image.append((d, j))
        scores.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert scores.compute() == pytest.approx(tuple(np.mean(per_image, axis=0)))
    scores.reset()
    assert scores.compute() == (0.0, 0.0)
