"""TeRA — a high-rank update from a frozen random Tucker network, shared across layers, trained by scaling vectors.

Gu et al., "TeRA: Vector-based Random Tensor Network for High-Rank Adaptation of Large Language Models" (arXiv
2509.03234, ACL 2026; code guyuxuan9/TeRA, not available here). What the paper's abstract fixes: ΔW is tensorised
and written as a Tucker-like tensor network whose large factors are random, frozen and shared across layers, and
only small layer-specific scaling vectors, the diagonals of diagonal factor matrices, are trained, so the rank of
ΔW is decoupled from the trainable count. The method section was not available; the network below is our
reading of that description::

    out = I₁·I₂, in = I₃·I₄        (each side factored in two, as balanced as its primes allow; 768 → 24·32)
    𝒳 = 𝒢 ×₁ (U₁Λ₁) ×₂ (U₂Λ₂) ×₃ (U₃Λ₃) ×₄ (U₄Λ₄),   ΔW = (α / √in) · reshape(𝒳, out × in)

with the core 𝒢 ∈ R^{R₁×…×R₄} (N(0, 1)) and the factors Uₙ ∈ R^{Iₙ×Rₙ} (orthonormal columns) random, frozen and
shared: one core per rank tuple and one factor per (Iₙ, Rₙ), the same objects in every layer that needs them
(:meth:`TeraDelta.build_shared`), rebuilt from ``seed`` on load and never saved. Λₙ = diag(λₙ) are the only
trainable numbers: Σₙ Rₙ per layer, while the matricised ΔW has rank up to min(R₁R₂, R₃R₄) (full at the default
Rₙ = min(Iₙ, r) with r = 64: rank 768 from 112 numbers on a 768 × 768 layer). Choices that are ours: the two-way
split of each side; λ₁…λ₃ = 1 and λ₄ = 0 at init (ΔW = 0, and λ₄ gets a gradient at once, as LoRA's B = 0
does); the α/√in scale (ΔW entries of variance α²/in at λ = 1). A side of prime width is one mode. On a Conv2d
the input is in·kh·kw.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d
from pathopeft.adapters.tlora import factorize


@dataclass
class TeraConfig(AdapterConfig):
    """TeRA: a frozen random Tucker network shared across layers; only Σ Rₙ diagonal scalings per layer train."""

    adapter_type: ClassVar[str] = "tera"
    r: int = 64  # Rₙ = min(Iₙ, r)
    alpha: float = 1.0
    seed: int = 0


def modes(out_features: int, in_features: int) -> list[int]:
    """The tensor's mode sizes: out split in two, then in split in two."""
    return factorize(out_features, 2) + factorize(in_features, 2)


def mode_ranks(out_features: int, in_features: int, r: int) -> list[int]:
    return [min(i, r) for i in modes(out_features, in_features)]


class TeraShared(nn.Module):
    """The frozen core tensors and factor matrices of one adapter, each drawn once and used by every layer."""

    def __init__(self, shapes: list[tuple[int, int]], r: int, seed: int) -> None:
        super().__init__()
        for out_f, in_f in dict.fromkeys(shapes):
            ranks = mode_ranks(out_f, in_f, r)
            core = self.core_name(ranks)
            if not hasattr(self, core):
                self.register_buffer(core, torch.randn(*ranks, generator=self._gen(seed, core)), persistent=False)
            for size, rank in zip(modes(out_f, in_f), ranks, strict=True):
                name = self.factor_name(size, rank)
                if not hasattr(self, name):
                    q, _ = torch.linalg.qr(torch.randn(size, rank, generator=self._gen(seed, name)))
                    self.register_buffer(name, q, persistent=False)

    @staticmethod
    def _gen(seed: int, key: str) -> torch.Generator:
        return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)

    @staticmethod
    def core_name(ranks: list[int]) -> str:
        return "core_" + "x".join(map(str, ranks))

    @staticmethod
    def factor_name(size: int, rank: int) -> str:
        return f"factor_{size}x{rank}"


class TeraDelta(Delta):
    def __init__(self, base: nn.Module, config: TeraConfig) -> None:
        super().__init__(base, config)
        self.modes = modes(self.out_features, self.in_features)
        self.ranks = mode_ranks(self.out_features, self.in_features, config.r)
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(r)) for r in self.ranks])
        nn.init.zeros_(self.scales[-1])
        self.scale = config.alpha / math.sqrt(self.in_features)
        self.shared: TeraShared  # set by AdapterModel.add_adapter from build_shared

    @classmethod
    def build_shared(cls, config: TeraConfig, layers: dict[str, nn.Module]) -> TeraShared:
        return TeraShared([tuple(weight_2d(m).shape) for m in layers.values()], config.r, config.seed)

    def core(self) -> torch.Tensor:
        return getattr(self.shared, TeraShared.core_name(self.ranks))

    def factors(self) -> list[torch.Tensor]:
        """The frozen Uₙ of this layer (shared objects)."""
        return [
            getattr(self.shared, TeraShared.factor_name(i, r)) for i, r in zip(self.modes, self.ranks, strict=True)
        ]

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        t = self.core().to(self.scales[0].dtype)
        for n, (u, lam) in enumerate(zip(self.factors(), self.scales, strict=True)):
            # mode-n product with Uₙ diag(λₙ): contract the tensor's mode n, then put the new mode back at n
            t = torch.movedim(torch.tensordot(u.to(lam.dtype) * lam, t, dims=([1], [n])), 0, n)
        return self.scale * t.reshape(self.out_features, self.in_features)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: TeraConfig) -> int:
        return sum(mode_ranks(out_features, in_features, config.r))


register("tera", TeraConfig, TeraDelta, conv=True, identity_at_init=True)

__all__ = ["TeraConfig", "TeraDelta", "TeraShared", "mode_ranks", "modes"]
