"""LoLDU — a frozen LDU slice of the weight with only its diagonal (and a scale) trained.

Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning" (arXiv 2410.13618; code SKDDJ/LoLDU @ 4fe87a0, ``minloldu/loldu.py``). LU with partial pivoting,
W = P L U, and U = D U' with D = diag(U) gives W = P L D U' (L unit lower, U' unit upper). With the first r
columns L_r of L, rows U'_r of U' and entries D_r of D::

    W' = (W − s₀ · P L_r diag(D_r) U'_r) + s · P L_r diag(z) U'_r,      z₀ = D_r,  s₀ = α / r
    ΔW = P L_r diag(s·z − s₀·D_r) U'_r

Trainable: z ∈ R^r and the scalar s (init s₀), r + 1 per layer; P, L_r, U'_r frozen (non-persistent buffers,
recomputed from the base weight: LU with pivoting is deterministic). W' = W at init, as the code subtracts the
initial product from the weight. The code's default ``lora_alpha`` is 1 (s₀ = 1/r); ``alpha=None`` keeps it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d


def ldu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """P, L (unit lower), D, U (unit upper) with w = P L diag(D) U (float32; k = min(out, in) columns/rows)."""
    P, L, U = torch.linalg.lu(w.float())
    D = torch.diagonal(U)
    return P, L, D, U / D.unsqueeze(-1)


#: |U'| above this means a near-zero pivot: z's Adam-sized steps become updates this much larger.
ILL_CONDITIONED = 1e3


@dataclass
class LolduConfig(AdapterConfig):
    """LoLDU: W's LDU slice of rank ``r`` frozen, its diagonal z and a scale trained (r + 1 per layer)."""

    adapter_type: ClassVar[str] = "loldu"
    r: int = 8
    alpha: float | None = None  # None: the code's lora_alpha = 1, so the initial scale is 1/r


class LolduDelta(Delta):
    def __init__(self, base: nn.Module, config: LolduConfig) -> None:
        super().__init__(base, config)
        self.r = min(config.r, self.out_features, self.in_features)
        self.s0 = (config.alpha if config.alpha is not None else 1.0) / config.r
        self.register_buffer("P", torch.empty(0), persistent=False)
        self.register_buffer("L", torch.empty(0), persistent=False)
        self.register_buffer("D", torch.empty(0), persistent=False)
        self.register_buffer("U", torch.empty(0), persistent=False)
        self._ensure_ldu(base)
        self.z = nn.Parameter(self.D.clone())
        self.scale = nn.Parameter(torch.tensor(self.s0))

    @torch.no_grad()
    def _ensure_ldu(self, base: nn.Module) -> None:
        if not self.D.numel():
            P, L, D, U = ldu(weight_2d(base))
            r = self.r
            self.P, self.L, self.D, self.U = P, L[:, :r].contiguous(), D[:r].contiguous(), U[:r].contiguous()
            if self.U.abs().max() > ILL_CONDITIONED:
                warnings.warn(
                    f"LoLDU: a layer's first r LU pivots include one near zero, so its frozen unit-upper factor U' "
                    f"has entries above {ILL_CONDITIONED:g}; updates to z are amplified by them and training "
                    f"may diverge (a smaller learning rate, or another method, for such weights)",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self._ensure_ldu(base)
        return self.P @ ((self.L * (self.scale * self.z - self.s0 * self.D)) @ self.U)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: LolduConfig) -> int:
        return min(config.r, out_features, in_features) + 1


register("loldu", LolduConfig, LolduDelta, conv=True, identity_at_init=True)

__all__ = ["LolduConfig", "LolduDelta", "ldu"]
