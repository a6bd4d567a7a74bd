"""``replay``: fine-tuning plus a small buffer of earlier tasks' training bags (experience replay).

Before every later task ``replay_per_task`` training bags of the previous task join the buffer (drawn with
a seeded RNG); the buffer trains next to the current task's bags. The replayed bags carry earlier classes, so
the training softmax spans every class seen so far — in the task-incremental setting too (masking it to the
current task's classes, as the other strategies do there, made a replayed bag's loss infinite); evaluation
there still masks to each task's own classes. The buffer is saved (slide ids in ``state.json``) after every
step and restored on resume.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy, StrategyStateError

if TYPE_CHECKING:
    import torch
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
        return self.cfg.seen_classes(t)

    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        return net  # no structure change; the buffer comes back through load_state

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"buffer": [r.slide_id for r in self.buffer]}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        by_id = {r.slide_id: r for task in self.cfg.tasks for r in self.data.bags(task, "train")}
        ids = list(values.get("buffer", []))
        missing = [s for s in ids if s not in by_id]
        if missing:
            raise StrategyStateError(
                f"replay buffer of the saved run holds {len(missing)} bag(s) no longer among the training bags "
                f"of {self.cfg.manifest} (first: {missing[0]!r}); restore the manifest or use another out_dir"
            )
        self.buffer = [by_id[s] for s in ids]
