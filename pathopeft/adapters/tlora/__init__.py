"""Transformed LoRA (TLoRA) — a full-rank Kronecker-structured transform of W plus a low-rank residual.

Tao et al., "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to Text-to-image
Models" (arXiv 2501.08727; the authors' release as vendored in marcocst/PEFTDiff @ 9c56d00,
``utils/attention_processor.py`` ``TTMLoRALinearLayer``, transform rank 1, LoRA residual, as its run script)::

    W' = W₀ T + s · B A,        T = A¹ ⊗ A² ⊗ … ⊗ A^D  (in × in, in = I₁·I₂·…·I_D),  s = α / √r
    ΔW = W₀ (T − I) + s · B A

The transform multiplies on the input side; its factors Aᵈ (Iᵈ × Iᵈ) start at the identity, so T = I, and B
starts at zero (A Kaiming-normal), so W' = W₀ at init. Trainable: Σ_d I_d² + r·(out + in) per layer. The input
width is factored into ``factors`` (default: up to 3 factors as close to equal as the prime factors allow,
e.g. 768 → 8·8·12); the paper's transform rank R > 1 (a tensor-ring T) and tensor-network residuals are not
included. On a Conv2d the input dimension is in·kh·kw. Unmerging solves W₀ = (W' − sBA) T⁻¹ with
T⁻¹ = ⊗ (Aᵈ)⁻¹ rather than keeping a copy of W₀.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d


def factorize(n: int, parts: int = 3) -> list[int]:
    """``n`` as up to ``parts`` factors, as balanced as its prime factors allow (768 → [8, 8, 12])."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    out = [1] * parts
    for q in sorted(primes, reverse=True):  # largest first into the smallest bin
        out[out.index(min(out))] *= q
    return sorted(f for f in out if f > 1) or [1]


@dataclass
class TloraConfig(AdapterConfig):
    """TLoRA: W' = W₀·(A¹⊗…⊗A^D) + (α/√r)·B A; the Kronecker factors start at identity, B at zero."""

    adapter_type: ClassVar[str] = "tlora"
    r: int = 8
    alpha: float = 1.0
    parts: int = 3  # number of Kronecker factors of the input width


class TloraDelta(Delta):
    def __init__(self, base: nn.Module, config: TloraConfig) -> None:
        super().__init__(base, config)
        self.dims = factorize(self.in_features, config.parts)
        self.factors = nn.ParameterList([nn.Parameter(torch.eye(d)) for d in self.dims])
        self.B = nn.Parameter(torch.zeros(self.out_features, config.r))
        self.A = nn.Parameter(torch.empty(config.r, self.in_features))
        nn.init.kaiming_normal_(self.A)
        self.scale = config.alpha / math.sqrt(config.r)

    def transform(self) -> torch.Tensor:
        return reduce(torch.kron, list(self.factors))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        w0 = weight_2d(base).detach().to(self.A.dtype)
        eye = torch.eye(self.in_features, dtype=w0.dtype, device=w0.device)
        return w0 @ (self.transform() - eye) + self.scale * (self.B @ self.A)

    def delta_from_merged(self, base: nn.Module) -> torch.Tensor:
        w = weight_2d(base).detach().to(self.A.dtype)
        t_inv = reduce(torch.kron, [torch.linalg.inv(f) for f in self.factors])
        w0 = (w - self.scale * (self.B @ self.A)) @ t_inv
        return w - w0

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: TloraConfig) -> int:
        return sum(d * d for d in factorize(in_features, config.parts)) + config.r * (out_features + in_features)


register("tlora", TloraConfig, TloraDelta, conv=True, identity_at_init=True)

__all__ = ["TloraConfig", "TloraDelta", "factorize"]
