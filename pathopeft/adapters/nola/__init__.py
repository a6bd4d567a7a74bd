"""NOLA — LoRA factors as linear combinations of frozen random bases.

Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis", ICLR 2024 (arXiv
2310.02556; code UCDvision/NOLA)::

    A = Σᵢ₌₁ᵏ αᵢ Aᵢ,   B = Σⱼ₌₁ˡ βⱼ Bⱼ,   ΔW = (α_lora / r) · B A

with Aᵢ ∈ R^{r×in}, Bⱼ ∈ R^{out×r} drawn from a fixed seed and frozen: k + l trainable numbers per layer,
whatever the rank and the layer size. α ~ U(−1/√k, 1/√k), β = 0 (identity at init), as the code's LoRA-style
init. The bases are regenerated from the seed (the config's ``seed`` mixed with a CRC of the layer's name, so
every layer has its own bases), never saved: an adapter file holds the coefficients only. Left open and chosen
here: bases N(0, 1/r) for A and N(0, 1/out) for B (unit-scale products), generated on the CPU in float32.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register


@dataclass
class NolaConfig(AdapterConfig):
    """NOLA: LoRA's A and B as combinations of ``num_basis_a``/``num_basis_b`` frozen random bases (k + l
    trainable per layer), rank ``r``, bases from ``seed``."""

    adapter_type: ClassVar[str] = "nola"
    r: int = 8
    num_basis_a: int = 64
    num_basis_b: int = 64
    alpha: float | None = None
    seed: int = 0
    layer_seed: int | None = None  # set per layer by for_layer

    def for_layer(self, name: str) -> NolaConfig:
        return dataclasses.replace(self, layer_seed=(self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


class NolaDelta(Delta):
    def __init__(self, base: nn.Module, config: NolaConfig) -> None:
        super().__init__(base, config)
        k, l, r = config.num_basis_a, config.num_basis_b, config.r
        self.coef_a = nn.Parameter(torch.empty(k).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k)))
        self.coef_b = nn.Parameter(torch.zeros(l))
        self.scale = (config.alpha if config.alpha is not None else r) / r
        g = torch.Generator().manual_seed(config.layer_seed if config.layer_seed is not None else config.seed)
        self.register_buffer(
            "basis_a", torch.randn(k, r, self.in_features, generator=g) / math.sqrt(r), persistent=False
        )
        self.register_buffer("basis_b", torch.randn(l, self.out_features, r, generator=g) / math.sqrt(self.out_features), persistent=False)  # fmt: skip

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        a = torch.einsum("k,kri->ri", self.coef_a, self.basis_a)
        b = torch.einsum("l,lor->or", self.coef_b, self.basis_b)
        return self.scale * (b @ a)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: NolaConfig) -> int:
        return config.num_basis_a + config.num_basis_b


register("nola", NolaConfig, NolaDelta, conv=True, identity_at_init=True)

__all__ = ["NolaConfig", "NolaDelta"]
