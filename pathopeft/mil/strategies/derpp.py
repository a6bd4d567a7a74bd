"""``derpp``: dark experience replay++ (Buzzega et al. 2020), as CoMEL's baseline.

Official: ``continual/main/continual_instance/cdatmil_ppl_derpp_trainer.py`` (CoMEL @ 9fd6679), buffer
``continual/cl_utils/buffer.py``, recipe ``run_cdatmil_ppl_derpp.sh`` (``--buffer_size 30``), ``der_alpha``
3.0 (``continual/configs.py`` L149).

* The reservoir buffer of ``erace`` (see :class:`~pathopeft.mil.strategies.erace.BagReservoir`), each slot
  with the bag's logits as the net gave them when the bag was trained (trainer L162: every class's logit).
* From the second task on, one buffer bag per step adds ``alpha · MSE(its logits now, stored logits)`` over
  every class (trainer L283-L292) ``+ beta · CE(its logits, its label)`` over the classes seen so far. The
  official code uses one buffer bag for both terms with the CE at weight 1 (``cls_alpha``); mammoth's DER++
  draws two; ``beta`` is kept as a setting with the official 1.0.
* The current bag's CE covers every class seen so far: the official head is not masked.

The official baselines all run with BPPL ("ppl" in the trainer names); pathopeft's default runs them
without it unless the config says ``use_bppl: true`` (the registry's ``bppl`` capability stays False).
The buffer's slide ids go to ``state.json``, its logits to ``task_<t>/strategy.safetensors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES
from pathopeft.mil.strategies.erace import ERACE, bag_logits, torch_label

if TYPE_CHECKING:
    import torch
    from torch import nn


def logit_loss(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """DER's term: mean squared error between the logits now and the stored ones (0 on its own logits)."""
    import torch.nn.functional as F

    return F.mse_loss(logits, stored.to(logits.device))


@STRATEGIES.register("derpp", rehearsal=True)
class DERPP(ERACE):
    """ERACE's buffer with stored logits; logit MSE + CE on one buffer bag per step."""

    key = "derpp"

    def train_classes(self, t: int) -> list[int]:
        return self.cfg.allowed(t)

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        from pathopeft.mil.module import masked

        losses = {}
        if t > 0 and len(self.buffer):
            slot = self.buffer.draw(self.rng)
            bag = self.buffer.bags[slot]
            logits = bag_logits(net, bag, out.bag_logits.device)
            label = torch_label(bag["label"], logits.device)
            losses["der_logits"] = self.opts["alpha"] * logit_loss(logits, self.buffer.extra[slot])
            losses["der_ce"] = self.opts["beta"] * F.cross_entropy(
                masked(logits, self.cfg.seen_classes(t))[None], label
            )
        self.buffer.offer(batch, self.rng, extra=out.bag_logits.detach().float().cpu().clone())
        return losses

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"logits.{i}": x for i, x in enumerate(self.buffer.extra)}, {"buffer": self.buffer.state()}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        super().load_state(tensors, values)
        self.buffer.extra = [tensors[f"logits.{i}"] for i in range(len(self.buffer))]
