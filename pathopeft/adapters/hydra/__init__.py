"""Hydra — parallel and sequential low-rank branches.

Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning" (arXiv 2309.06922;
code extremebird/Hydra). A parallel LoRA branch on the input and a sequential one on the frozen layer's
output::

    y = W₀x + b + B_p A_p x + B_s A_s (W₀x),      ΔW = B_p A_p + B_s A_s W₀

A_p: r×in, B_p: out×r, A_s: r×out, B_s: out×r, so r·(in + 3·out) trainable per layer; A Kaiming-uniform, B zero
(identity at init), scaled by α/r as LoRA. Chosen where the paper leaves it open: the sequential branch reads
W₀x *without* the bias, so the adapter merges exactly into W (ΔW above); on a Conv2d the sequential branch is a
1×1 map over the output channels (W₀ viewed as out × in·kh·kw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d


@dataclass
class HydraConfig(AdapterConfig):
    """Hydra: a parallel (B_p A_p x) and a sequential (B_s A_s W₀x) rank-``r`` branch, scaled by alpha/r."""

    adapter_type: ClassVar[str] = "hydra"
    r: int = 8
    alpha: float | None = None  # None: alpha = r (scale 1)


class HydraDelta(Delta):
    def __init__(self, base: nn.Module, config: HydraConfig) -> None:
        super().__init__(base, config)
        r, out, inp = config.r, self.out_features, self.in_features
        self.A_p = nn.Parameter(torch.empty(r, inp))
        self.B_p = nn.Parameter(torch.zeros(out, r))
        self.A_s = nn.Parameter(torch.empty(r, out))
        self.B_s = nn.Parameter(torch.zeros(out, r))
        for a in (self.A_p, self.A_s):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = (config.alpha if config.alpha is not None else r) / r

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        w0 = weight_2d(base).detach().to(self.A_p.dtype)
        return self.scale * (self.B_p @ self.A_p + self.B_s @ (self.A_s @ w0))

    def delta_from_merged(self, base: nn.Module) -> torch.Tensor:
        """W' − W₀ from the merged W' = (I + s·B_s A_s) W₀ + s·B_p A_p, solving for W₀ with Woodbury's identity
        (an r×r solve) instead of keeping a copy of W₀."""
        w = weight_2d(base).detach().to(self.A_p.dtype)
        s = self.scale
        rhs = w - s * (self.B_p @ self.A_p)
        small = torch.eye(self.A_s.shape[0], dtype=w.dtype, device=w.device) + s * (self.A_s @ self.B_s)
        w0 = rhs - s * self.B_s @ torch.linalg.solve(small, self.A_s @ rhs)
        return w - w0

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: HydraConfig) -> int:
        return config.r * (in_features + 3 * out_features)


register("hydra", HydraConfig, HydraDelta, conv=True, identity_at_init=True)

__all__ = ["HydraConfig", "HydraDelta"]
