"""The one Dice/IoU convention of pathopeft, for training-time validation and for ``seg compare`` alike.

MONAI's ``DiceMetric`` and ``MeanIoU`` on argmax predictions, foreground classes only
(``include_background=False``), with ``ignore_empty=False``: a class absent from the ground truth scores 1 when
the prediction is also empty (nothing to find, nothing found) and 0 when something was predicted. Scores are
averaged over classes and then over the items scored (tiles in training, whole images in ``seg compare``), so
every item counts and no score is ever NaN.
"""

from __future__ import annotations

import torch


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, H, W) class indices → (B, C, H, W) one-hot, the layout MONAI's metrics want."""
    return torch.nn.functional.one_hot(labels.long(), n_classes).permute(0, 3, 1, 2).float()


class DiceIoU:
    """Accumulates Dice and IoU over batches of (prediction, target) class-index maps; see the module docstring."""

    def __init__(self, n_classes: int) -> None:
        from monai.metrics import DiceMetric, MeanIoU

        self.n_classes = n_classes
        self.dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        self.iou = MeanIoU(include_background=False, reduction="mean", ignore_empty=False)
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add (B, H, W) predicted and true class indices (or one (H, W) image)."""
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        p, t = one_hot(pred, self.n_classes), one_hot(target, self.n_classes)
        self.dice(y_pred=p, y=t)
        self.iou(y_pred=p, y=t)
        self.count += len(pred)

    def compute(self) -> tuple[float, float]:
        """(mean Dice, mean IoU) of everything added; (0, 0) when nothing was."""
        if not self.count:
            return 0.0, 0.0
        return float(self.dice.aggregate()), float(self.iou.aggregate())

    def reset(self) -> None:
        self.dice.reset()
        self.iou.reset()
        self.count = 0


def dice_iou(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> tuple[float, float]:
    """Dice and IoU of one (H, W) prediction against its truth, by the convention above."""
    m = DiceIoU(n_classes)
    m.update(pred, target)
    return m.compute()
