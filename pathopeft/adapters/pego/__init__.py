"""PEGO — a group of LoRAs per layer kept orthogonal to the pretrained weight and to each other.

Hu et al., "Learn to Preserve and Diversify: Parameter-Efficient Group with Orthogonal Regularization for Domain
Generalization" (arXiv 2407.15085, ECCV 2024; code JudgingH/PEGO @ fb8700b: ``domainbed/networks/lora.py``, the
loss of class ``PEGO`` in ``domainbed/algorithms/algorithms.py``). Each adapted layer carries ``members`` LoRAs
whose outputs add up (no α/r scale, no dropout; A Kaiming-uniform, B zero)::

    ΔW = Σᵢ Bᵢ Aᵢ,     R = λ · [ Σᵢ ‖W ΔWᵢᵀ‖₁ + Σ_{i<j} ‖ΔWᵢ ΔWⱼᵀ‖₁ ]      (entrywise L1, summed over layers)

The first term ("preserve") pushes every row of each member's update orthogonal to the frozen pretrained rows
W; the second ("diversify") makes the members orthogonal to one another. R = 0 exactly when both hold; it is the
``regularizer`` capability, weight ``reg_weight`` (λ = 1e-3 in the code's ``run.sh``). After training the group
merges into W like any LoRA, so inference costs nothing. As the code, a fused ``qkv`` layer is adapted on its q
and v thirds only, each third with its own group and its own terms (``qkv_parts="qkv"`` adapts all three).
Defaults from ``run.sh``: rank 4, 4 members (2 on PACS). Conv2d layers use the out × in·kh·kw view.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, active_layers, register, weight_2d


@dataclass
class PegoConfig(AdapterConfig):
    """PEGO: ``members`` LoRAs per layer, summed, with the preserve/diversify orthogonality regulariser."""

    adapter_type: ClassVar[str] = "pego"
    r: int = 4
    members: int = 4  # lora_nums
    reg_weight: float = 1e-3  # λ (ld)
    qkv_parts: str = "qv"  # on a fused qkv layer: which thirds are adapted ("qv" as the code, or "qkv")
    parts: list[int] = dataclasses.field(default_factory=list)  # set per layer: adapted thirds of a qkv layer

    def for_layer(self, name: str) -> PegoConfig:
        if name.rsplit(".", 1)[-1] == "qkv":
            return dataclasses.replace(self, parts=["qkv".index(c) for c in self.qkv_parts])
        return self


def _slices(out_features: int, parts: list[int]) -> list[tuple[int, int]]:
    if not parts:
        return [(0, out_features)]
    third = out_features // 3
    return [(p * third, (p + 1) * third) for p in parts]


class PegoDelta(Delta):
    def __init__(self, base: nn.Module, config: PegoConfig) -> None:
        super().__init__(base, config)
        self.slices = _slices(self.out_features, config.parts)
        k, n, r, rows = config.members, len(self.slices), config.r, self.slices[0][1] - self.slices[0][0]
        self.A = nn.Parameter(torch.empty(k, n, r, self.in_features))
        self.B = nn.Parameter(torch.zeros(k, n, rows, r))
        for a in self.A.view(-1, self.in_features).split(r):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def member_updates(self) -> torch.Tensor:
        """ΔWᵢ of every member on every adapted slice: (members, slices, rows, in)."""
        return self.B @ self.A

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        parts = self.member_updates().sum(0)
        if len(self.slices) == 1 and self.slices[0] == (0, self.out_features):
            return parts[0]
        dw = torch.zeros(self.out_features, self.in_features, dtype=parts.dtype, device=parts.device)
        for (a, b), p in zip(self.slices, parts, strict=True):
            dw[a:b] = p
        return dw

    def regulariser(self, base: nn.Module) -> torch.Tensor:
        """Σᵢ ‖W ΔWᵢᵀ‖₁ + Σ_{i<j} ‖ΔWᵢ ΔWⱼᵀ‖₁ on every adapted slice, through the factors (no m×n product)."""
        w = weight_2d(base).detach().to(self.A.dtype)
        total = self.A.new_zeros(())
        k = self.A.shape[0]
        for s, (a, b) in enumerate(self.slices):
            A, B = self.A[:, s], self.B[:, s]  # (k, r, in), (k, rows, r)
            preserve = (w[a:b] @ A.transpose(1, 2)) @ B.transpose(1, 2)  # W ΔWᵢᵀ = (W Aᵢᵀ) Bᵢᵀ
            total = total + preserve.abs().sum()
            for i in range(k):
                for j in range(i + 1, k):
                    total = total + (B[i] @ (A[i] @ A[j].T) @ B[j].T).abs().sum()
        return total

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: PegoConfig) -> int:
        slices = _slices(out_features, config.parts)
        rows = slices[0][1] - slices[0][0]
        return config.members * len(slices) * config.r * (in_features + rows)


def pego_loss(model: nn.Module) -> torch.Tensor | None:
    """λ · the preserve and diversify terms over every PEGO layer (the ``regularizer`` capability)."""
    terms, weight = [], None
    for m in active_layers(model, PegoDelta).values():
        d = m.deltas[m.active]
        terms.append(d.regulariser(m.base_layer))
        weight = d.config.reg_weight
    if not terms or not weight:
        return None
    return weight * torch.stack(terms).sum()


register("pego", PegoConfig, PegoDelta, conv=True, identity_at_init=True, regularizer=pego_loss)

__all__ = ["PegoConfig", "PegoDelta", "pego_loss"]
