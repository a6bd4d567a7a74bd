"""ALLoRA — LoRA without dropout or scaling, each output row's gradient scaled down as that row grows.

Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws" (arXiv 2410.09692, §4.2 and
Appendix F, Listing 1). With f(x) = B A x (no α/r, no dropout; A Kaiming-uniform, B zero as LoRA) and
g = ∂L/∂(BA) (out × in), the gradient that reaches A and B is

    g̃ᵢ = gᵢ / √(‖(BA)ᵢ,:‖₂ + 1/η²)        for every output row i (the norm is not squared)

so a row starts at the largest step η (‖·‖ = 0 while B = 0) and slows as it grows. As the paper's listing, the
gradient passed on to earlier layers is left unscaled: here the scale is a hook on ΔW = BA alone, so the input's
gradient, which flows through W + ΔW, is untouched. ``eta_sq`` = η² (the paper sweeps {1, 2, 4}; its listing
hard-codes 1/η² = 1/4, the default here). The norms are taken on the detached ΔW of the same forward, as the
listing stores them in its forward. Conv2d layers: rows are output channels of the out × in·kh·kw view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, base_forward_with_weight, register


@dataclass
class AlloraConfig(AdapterConfig):
    """ALLoRA: ΔW = B A without scale or dropout; row i's gradient divided by √(‖(BA)ᵢ‖ + 1/η²)."""

    adapter_type: ClassVar[str] = "allora"
    r: int = 8
    eta_sq: float = 4.0


def row_scale(dw: torch.Tensor, eta_sq: float) -> torch.Tensor:
    """1 / √(‖ΔWᵢ,:‖₂ + 1/η²) per output row (the factor ALLoRA multiplies ∂L/∂ΔW's rows by)."""
    return torch.rsqrt(torch.linalg.vector_norm(dw.detach(), dim=1) + 1.0 / eta_sq)


class AlloraDelta(Delta):
    def __init__(self, base: nn.Module, config: AlloraConfig) -> None:
        super().__init__(base, config)
        self.A = nn.Parameter(torch.empty(config.r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, config.r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.eta_sq = config.eta_sq

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.B @ self.A

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        dw = self.delta_weight(base)
        if dw.requires_grad:
            scale = row_scale(dw, self.eta_sq)
            dw.register_hook(lambda g: g * scale[:, None].to(g.dtype))
        return base_forward_with_weight(base, x, base.weight + dw.to(base.weight.dtype).view_as(base.weight))

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: AlloraConfig) -> int:
        return config.r * (out_features + in_features)


register("allora", AlloraConfig, AlloraDelta, conv=True, identity_at_init=True)

__all__ = ["AlloraConfig", "AlloraDelta", "row_scale"]
