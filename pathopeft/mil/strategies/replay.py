"""``replay``: fine-tuning plus a small buffer of earlier tasks' training bags (experience replay).

Before every later task ``replay_per_task`` training bags of the previous task join the buffer (drawn with
a seeded RNG); the buffer trains next to the current task's bags. The replayed bags carry earlier classes, so
the training softmax spans every class seen so far — in the task-incremental setting too (masking it to the
current task's classes, as the other strategies do there, made a replayed bag's loss infinite); evaluation
there still masks to each task's own classes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy

if TYPE_CHECKING:
    from torch import nn

    from pathopeft.mil.config import ContinualConfig
    from pathopeft.mil.data import BagRecord


@STRATEGIES.register("replay", rehearsal=True)
class Replay(Strategy):
    """A growing buffer; nothing else differs from ``finetune``."""

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        super().__init__(cfg, data)
        self.buffer: list[BagRecord] = []

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t > 0:
            rng = random.Random(self.cfg.seed + t)
            pool = self.data.bags(self.cfg.tasks[t - 1], "train")
            self.buffer += rng.sample(pool, min(self.cfg.replay_per_task, len(pool)))
        return net

    def replay_bags(self, t: int) -> list[BagRecord]:
        return list(self.buffer)

    def train_classes(self, t: int) -> list[int]:
        seen = [self.cfg.cls(self.cfg.benign)] + [self.cfg.task_cls(s) for s in range(t + 1)]
        return list(dict.fromkeys(seen))
