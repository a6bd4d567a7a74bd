"""``inflora``: interference-free LoRA (Liang & Li, CVPR 2024) as CoMEL's baseline builds it.

Official: ``continual/modules/cl_modules/cdatmil_inflora.py`` (CoMEL @ 9fd6679: wrapping L279-L311,
``expand_orthogonal_lora`` L315-L349), its ``lora.py`` (``LoRALinearLayer`` L7-L61) and
``continual/main/continual_instance/cdatmil_ppl_inflora_trainer.py`` (``set_optimizer`` L53-L124,
``after_task`` L331-L333).

* The first task trains the whole net, without LoRA.
* Every later task adds one LoRA to every linear layer of the MIL model except the bag classifier and
  layers with one output (official L283): rank ``3r`` for a ``qkv`` layer, ``r`` otherwise, with ``r`` 16
  (the model hard-codes ``self.rank = 16``, L248; the recipe's ``--rank 8`` does not reach it).
* Its down-projection A is drawn as ``LoRALinearLayer`` draws it (normal, std ``1/rank``; B zero), projected
  off the row space of every earlier task's A and row-normalised (:func:`design_down`), then frozen; B trains.
  The official projection subtracts ``A·AₖᵀAₖ`` per earlier Aₖ, an orthogonal projection only when the Aₖ
  have orthonormal rows (and it re-subtracts the running sum for a third task on); here it is the exact
  projection off their joint row space. The paper designs A from the task's inputs (DualGPM); CoMEL's
  baseline does not, and neither does this.
* Trained in later tasks: the current B, the bag classifier and the instance head. The official optimizer
  also takes the adapted layers' base weights and earlier B's (trainer L90-L100), which is fine-tuning
  plus LoRA rather than InfLoRA; they stay frozen here.

The official baselines all run with BPPL ("ppl" in the trainer names); pathopeft's default runs them
without it unless the config says ``use_bppl: true`` (the registry's ``bppl`` capability stays False).
The LoRAs are part of the net's state dict; :meth:`rebuild` re-adds them on resume, so no state is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy

if TYPE_CHECKING:
    from pathopeft.mil.config import ContinualConfig

DEFAULTS: dict[str, Any] = {"r": 16}


def design_down(rank: int, in_features: int, earlier: list[torch.Tensor]) -> torch.Tensor:
    """A new (rank, in_features) down-projection: random rows with the row space of ``earlier`` removed,
    each row of unit norm (a row with nothing left, once the earlier spaces fill the input, stays zero)."""
    a = torch.randn(rank, in_features) / rank
    if earlier:
        basis = torch.cat(earlier).T.double()  # (in, Σ ranks): columns span the earlier row spaces
        u, s, _ = torch.linalg.svd(basis, full_matrices=False)
        q = u[:, s > s.max() * max(basis.shape) * torch.finfo(torch.double).eps]
        a = (a.double() - (a.double() @ q) @ q.T).float()
    norm = a.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-6, a / norm.clamp_min(1e-12), torch.zeros_like(a))


class InfLoRALinear(nn.Module):
    """A frozen linear layer plus one LoRA per later task: ``base(x) + Σₖ Bₖ Aₖ x``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.downs = nn.ParameterList()
        self.ups = nn.ParameterList()

    def add(self, rank: int) -> None:
        w = self.base.weight
        down = design_down(rank, self.base.in_features, [d.detach().cpu() for d in self.downs])
        self.downs.append(nn.Parameter(down.to(w), requires_grad=False))
        self.ups.append(nn.Parameter(torch.zeros(self.base.out_features, rank, dtype=w.dtype, device=w.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for down, up in zip(self.downs, self.ups, strict=True):
            y = y + (x @ down.T) @ up.T
        return y


def wrap_linears(mil: nn.Module) -> list[tuple[str, InfLoRALinear]]:
    """Every ``nn.Linear`` of ``mil`` but the classifier and one-output layers, replaced by an
    :class:`InfLoRALinear` (idempotent: already wrapped layers are returned as they are)."""
    found = [(n, m) for n, m in mil.named_modules() if isinstance(m, InfLoRALinear)]
    if found:
        return found
    targets = [
        (n, m)
        for n, m in mil.named_modules()
        if isinstance(m, nn.Linear) and "classifier" not in n and m.out_features > 1
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(mil.get_submodule(parent_name) if parent_name else mil, child, InfLoRALinear(lin))
    return [(n, mil.get_submodule(n)) for n, _ in targets]


@STRATEGIES.register("inflora")
class InfLoRA(Strategy):
    """One frozen-A LoRA per later task on every adapted layer; only the newest B and the heads train."""

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        super().__init__(cfg, data)
        self.r = int({**DEFAULTS, **cfg.inflora}["r"])

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t == 0:
            return net
        mil = net.mil
        for p in net.parameters():
            p.requires_grad_(False)
        for name, layer in wrap_linears(mil):
            layer.add(3 * self.r if "qkv" in name else self.r)
            layer.ups[-1].requires_grad_(True)
        heads = [mil.get_submodule(n) for n, _ in mil.named_modules() if n.endswith("classifier")]
        for head in [*heads, getattr(net, "instance_head", None)]:
            if head is not None:
                for p in head.parameters():
                    p.requires_grad_(True)
        return net
