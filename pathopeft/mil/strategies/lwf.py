"""``lwf``: learning without forgetting (Li & Hoiem 2016), as CoMEL's baseline.

Official: ``continual/main/continual_instance/cdatmil_ppl_lwf_trainer.py`` (CoMEL @ 9fd6679): before a later
task the model as it is then records its logits on the task's training bags (L69-L110); training adds
``lwf_alpha ·`` :func:`kd_loss` on the logits of the earlier tasks' classes (L266-L272, with ``smooth`` and
``modified_kl_div``, L45-L50), ``lwf_alpha`` 1.0 (``continual/configs.py`` L150, not set by the
continual_instance recipe) and temperature 2.

Here the model before step ``t`` is kept as a frozen teacher in eval mode and gives those logits on each
training bag as it arrives: the same numbers as the official precomputed ones (no augmentation, no
dropout). It needs no saved state: the teacher of step ``t`` is the net step ``t − 1`` saved, which a
resumed run restores before ``before_task(t)`` copies it. The current bag's CE covers every class seen so
far (the official head is not masked).

The official baselines all run with BPPL ("ppl" in the trainer names); pathopeft's default runs them
without it unless the config says ``use_bppl: true`` (the registry's ``bppl`` capability stays False).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy
from pathopeft.mil.strategies.erace import DEFAULTS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pathopeft.mil.config import ContinualConfig


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The official distillation term: with ``p = softmax(logits)`` sharpened as ``p^(1/T)/Σ p^(1/T)``,
    ``−Σ p_teacher · log p_student``. A cross-entropy, not a KL: when student == teacher it is the entropy of
    the teacher's distribution (its minimum over students), and its gradient there is zero."""
    import torch

    def smooth(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=-1) ** (1.0 / temperature)
        return p / p.sum(-1, keepdim=True)

    return -(smooth(teacher.detach()) * torch.log(smooth(student))).sum(-1).mean()


@STRATEGIES.register("lwf")
class LwF(Strategy):
    """A frozen copy of the previous net distils its old-class outputs into the net being trained."""

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        super().__init__(cfg, data)
        self.opts = {**DEFAULTS["lwf"], **cfg.lwf}
        self.teacher: nn.Module | None = None

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        self.teacher = None
        if t > 0:
            self.teacher = copy.deepcopy(net).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return net

    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        return net  # no structure change; the teacher is the restored net, copied in before_task

    def train_classes(self, t: int) -> list[int]:
        return self.cfg.allowed(t)

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        import torch

        if self.teacher is None:
            return {}
        device = out.bag_logits.device
        self.teacher.to(device).eval()
        with torch.no_grad():
            t_out, _ = self.teacher(batch["features"].to(device), batch["coords"].to(device).float())
        old = self.cfg.seen_classes(t - 1)
        kd = kd_loss(out.bag_logits[None, old], t_out.bag_logits[None, old], self.opts["temperature"])
        return {"lwf": self.opts["weight"] * kd}
