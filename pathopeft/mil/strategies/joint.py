"""``joint``: one training run on every task together — the upper bound of the comparison.

Its single evaluation covers every task and is reported as the last row of the accuracy matrix.
"""

from __future__ import annotations

from pathopeft.mil.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("joint", rehearsal=True, all_tasks_at_once=True)
class Joint(Strategy):
    """One step, all tasks' bags, every class in the softmax."""

    def n_steps(self) -> int:
        return 1

    def train_tasks(self, t: int) -> list[str]:
        return list(self.cfg.tasks)

    def train_classes(self, t: int) -> list[int]:
        return list(range(len(self.cfg.classes)))

    def tasks_seen(self, t: int) -> list[int]:
        return list(range(len(self.cfg.tasks)))
