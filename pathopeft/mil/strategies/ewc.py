"""``ewc``: fine-tuning plus elastic weight consolidation (Kirkpatrick et al. 2017).

Before every later task the diagonal Fisher of the previous task's bag loss is estimated on up to
``collect_bags`` of its training bags; the training module adds ``ewc_lambda/2 · Σ F (θ − θ*)²``.
The Fisher terms and anchors are saved after every step (``task_<t>/strategy.safetensors``) and restored on
resume, so a resumed run penalizes exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pathopeft.mil.config import ContinualConfig


@STRATEGIES.register("ewc")
class EWC(Strategy):
    """Keeps one Fisher/anchor pair per parameter; a later task's estimate replaces the earlier one."""

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        super().__init__(cfg, data)
        self.penalty: dict[str, tuple[Any, Any]] = {}

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t > 0:
            from pathopeft.mil.module import fisher_diagonal

            prev = self.data.loaded(self.data.bags(self.cfg.tasks[t - 1], "train"), self.cfg.collect_bags)
            self.penalty.update(fisher_diagonal(net, prev, self.train_classes(t - 1)))
        return net

    def module_kwargs(self, t: int) -> dict[str, Any]:
        return {"ewc": self.penalty, "ewc_lambda": self.cfg.ewc_lambda}

    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        return net  # no structure change; the penalty comes back through load_state

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for name, (fisher, anchor) in self.penalty.items():
            tensors[f"fisher.{name}"], tensors[f"anchor.{name}"] = fisher, anchor
        return tensors, {"penalty_order": list(self.penalty)}  # the penalty's sum runs in this order

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.penalty = {n: (tensors[f"fisher.{n}"], tensors[f"anchor.{n}"]) for n in values.get("penalty_order", [])}
