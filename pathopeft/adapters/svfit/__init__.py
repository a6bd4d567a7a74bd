"""SVFit — fine-tuning only the top-r singular values of each weight.

Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values"
(arXiv 2409.05926). With W = U diag(s) Vᵀ (thin SVD; conv kernels viewed as out × in·kh·kw), the top-r singular
vectors are frozen and the r singular values trained::

    W' = U_r diag(s_r + δ) V_rᵀ + (W − U_r diag(s_r) V_rᵀ),      ΔW = U_r diag(δ) V_rᵀ,   δ ∈ R^r, δ₀ = 0

Trainable: r per layer. We train the change δ rather than s_r' = s_r + δ (the same gradients, and a saved
adapter stays valid however the base SVD is recomputed); U, V are non-persistent buffers recomputed from the
base weight with :func:`~pathopeft.adapters.core.signed_svd`. Left open by the paper and chosen here: no scale
factor, no ReLU on s_r + δ, r capped at min(out, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, signed_svd, weight_2d


@dataclass
class SvfitConfig(AdapterConfig):
    """SVFit: train the top-``r`` singular values of each target weight (r per layer), vectors frozen."""

    adapter_type: ClassVar[str] = "svfit"
    r: int = 8


class SvfitDelta(Delta):
    def __init__(self, base: nn.Module, config: SvfitConfig) -> None:
        super().__init__(base, config)
        self.r = min(config.r, self.out_features, self.in_features)
        self.delta = nn.Parameter(torch.zeros(self.r))
        self.register_buffer("U", torch.empty(0), persistent=False)
        self.register_buffer("Vh", torch.empty(0), persistent=False)

    def _ensure_svd(self, base: nn.Module) -> None:
        if not self.U.numel():
            U, _, Vh = signed_svd(weight_2d(base))
            self.U, self.Vh = U[:, : self.r].contiguous(), Vh[: self.r].contiguous()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self._ensure_svd(base)
        return (self.U * self.delta) @ self.Vh

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SvfitConfig) -> int:
        return min(config.r, out_features, in_features)


register("svfit", SvfitConfig, SvfitDelta, conv=True, identity_at_init=True)

__all__ = ["SvfitConfig", "SvfitDelta"]
