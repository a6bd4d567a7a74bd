"""IncreLoRA — ranks added during training to the modules that matter most, up to a total budget.

Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning"
(arXiv 2308.12043; code FeiyuZhang98/IncreLoRA @ 51a2d73: ``loralib/loralib/increlora.py``, the trainer's
``compute_svd_orth_regu``). Each layer is AdaLoRA-shaped, one scalar per rank::

    ΔW = (α / k) · B diag(E) A        k = the layer's active ranks; A, B ~ N(0, 0.02); E = 0 at init

Every step the module's importance s = Σ|ΔW ⊙ ∂L/∂ΔW| / √(numel ΔW) is smoothed as the code does
(Ī ← β₁Ī + (1−β₁)s, Ū ← β₂Ū + (1−β₂)|s − Ī|, score = Ī·Ū); after ``warmup_steps``, every ``interval`` steps
the ``top_h`` highest-scoring modules each get ``ranks_per_step`` more ranks, until the total reaches the budget
``r × number of layers`` (the code can overshoot it; here the last addition is cut to fit). A new rank enters
with E = 0 and the layer's old E are rescaled by k_new / k_old, so the output is unchanged at the moment of
growth (the code rescales the whole layer by α/k_new and starts new ranks at E = 1e-5, its "advance learning",
a small jump). The code's orthogonality penalty (‖AAᵀ − I‖_F + ‖BᵀB − I‖_F over every rank, averaged over
2 × layers, weight 0.1 in its scripts) is the ``regularizer`` capability, ``orth_weight``.

Chosen here: ranks live in a preallocated reserve of ``max_rank`` per layer (masked until used), so growth
never changes a tensor's shape and the optimiser needs no new parameter groups (the code appends groups and
gives each its own warm-up); defaults follow the code's small-task scripts (``init_rank`` 1, ``ranks_per_step``
from its table {2:1, 4:2, 6:3, 8:4}, β 0.85, warm-up and interval in steps). The active mask is saved with the
adapter. Conv2d layers are adapted on the out × in·kh·kw view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import (
    AdapterConfig,
    Delta,
    active_deltas,
    base_forward_with_weight,
    register,
)

RANKS_PER_STEP = {2: 1, 4: 2, 6: 3, 8: 4}  # the code's incre_rank_num by target rank


@dataclass
class IncreLoraConfig(AdapterConfig):
    """IncreLoRA: start at ``init_rank`` per layer, add ranks to the most important layers up to r × layers."""

    adapter_type: ClassVar[str] = "increlora"
    r: int = 8  # the average rank the budget allows (target_rank)
    alpha: float | None = None  # None: alpha = r
    init_rank: int = 1
    max_rank: int | None = None  # a layer's reserve; None: 4·r
    ranks_per_step: int | None = None  # None: the code's table, else r // 2
    top_h: int = 10
    warmup_steps: int = 100
    interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_weight: float = 0.1

    def capacity(self, out_features: int, in_features: int) -> int:
        return min(self.max_rank or 4 * self.r, out_features, in_features)


class IncreLoraDelta(Delta):
    def __init__(self, base: nn.Module, config: IncreLoraConfig) -> None:
        super().__init__(base, config)
        cap = config.capacity(self.out_features, self.in_features)
        self.alpha = float(config.alpha if config.alpha is not None else config.r)
        self.A = nn.Parameter(torch.randn(cap, self.in_features) * 0.02)
        self.B = nn.Parameter(torch.randn(self.out_features, cap) * 0.02)
        self.E = nn.Parameter(torch.zeros(cap))
        active = torch.zeros(cap, dtype=torch.bool)
        active[: min(config.init_rank, cap)] = True
        self.register_buffer("active", active)
        self.ema_ipt = self.ema_unc = 0.0  # the smoothed importance (not saved: a resumed fit re-learns it)
        self._sensitivity: float | None = None

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        e = self.E * self.active.to(self.E.dtype)
        return (self.alpha / max(1, self.rank)) * ((self.B * e) @ self.A)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        dw = self.delta_weight(base)
        if self.training and dw.requires_grad:  # the code's hook: importance from ΔW and dL/dΔW
            dw.register_hook(self._record(dw.detach()))
        return base_forward_with_weight(base, x, base.weight + dw.to(base.weight.dtype).view_as(base.weight))

    def _record(self, dw: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            self._sensitivity = float((dw * grad).abs().sum() / dw.numel() ** 0.5)

        return hook

    def update_importance(self) -> None:
        """Fold the last backward's sensitivity into the smoothed score (the code's ``update_ipt``)."""
        if self._sensitivity is None:
            return
        c, s = self.config, self._sensitivity
        self.ema_ipt = c.beta1 * self.ema_ipt + (1 - c.beta1) * s
        self.ema_unc = c.beta2 * self.ema_unc + (1 - c.beta2) * abs(s - self.ema_ipt)
        self._sensitivity = None

    @property
    def score(self) -> float:
        return self.ema_ipt * self.ema_unc

    @torch.no_grad()
    def grow(self, n: int) -> int:
        """Activate up to ``n`` reserve ranks with E = 0, rescaling the old E so the output does not change."""
        free = torch.nonzero(~self.active).flatten()[:n]
        if not len(free):
            return 0
        old = self.rank
        self.E.mul_((old + len(free)) / max(1, old))
        self.E[free] = 0.0
        self.active[free] = True
        return len(free)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: IncreLoraConfig) -> int:
        return config.capacity(out_features, in_features) * (out_features + in_features + 1)


def increlora_deltas(model: nn.Module) -> list[IncreLoraDelta]:
    return list(active_deltas(model, IncreLoraDelta).values())


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """Active ranks per IncreLoRA layer (the ``layer_ranks`` capability)."""
    return {n: d.rank for n, d in active_deltas(model, IncreLoraDelta).items()}


def total_rank(model: nn.Module) -> int:
    return sum(d.rank for d in increlora_deltas(model))


def allocate(model: nn.Module, step: int) -> int:
    """One step of the schedule: update every layer's importance; after warm-up, every ``interval`` steps give
    ``ranks_per_step`` ranks to each of the ``top_h`` best layers, never past the budget. Returns ranks added."""
    deltas = increlora_deltas(model)
    if not deltas:
        return 0
    for d in deltas:
        d.update_importance()
    c = deltas[0].config
    budget = c.r * len(deltas)
    room = budget - sum(d.rank for d in deltas)
    if room <= 0 or step <= c.warmup_steps or step % c.interval:
        return 0
    per = c.ranks_per_step or RANKS_PER_STEP.get(c.r, max(1, c.r // 2))
    added = 0
    for d in sorted((d for d in deltas if d.rank < d.active.numel()), key=lambda d: -d.score)[: c.top_h]:
        added += d.grow(min(per, room - added))
        if added >= room:
            break
    return added


class IncreLoraAllocator(pl.Callback):
    """Runs :func:`allocate` before each optimiser step (gradients present, as in the code): the ``callback``
    capability of ``increlora``."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        allocate(pl_module, trainer.global_step + 1)


def increlora_loss(model: nn.Module) -> torch.Tensor | None:
    """The code's orthogonality penalty over all ranks, averaged over 2 × layers, times ``orth_weight``."""
    deltas = increlora_deltas(model)
    if not deltas or deltas[0].config.orth_weight == 0:
        return None
    total = 0.0
    for d in deltas:
        eye = torch.eye(d.A.shape[0], device=d.A.device, dtype=d.A.dtype)
        total = total + torch.linalg.norm(d.A @ d.A.T - eye) + torch.linalg.norm(d.B.T @ d.B - eye)
    return deltas[0].config.orth_weight * total / (2 * len(deltas))


register("increlora", IncreLoraConfig, IncreLoraDelta, conv=True, identity_at_init=True,
         callback=IncreLoraAllocator, regularizer=increlora_loss, layer_ranks=layer_ranks)  # fmt: skip

__all__ = ["IncreLoraAllocator", "IncreLoraConfig", "IncreLoraDelta", "allocate", "increlora_loss", "layer_ranks",
           "total_rank"]  # fmt: skip
