"""RandLoRA in the adapter core, so it adapts Conv2d too: full-rank updates from shared random bases.

Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (ICLR 2025, arXiv
2502.00987); PEFT 0.21 ``tuners/randlora`` (dense bases, ``init_weights=True``), whose Linear path this matches
exactly (tested against ``peft.RandLoraConfig`` on the same layers). One pair of random bases is drawn for the
whole model, sized for its largest target (``Delta.build_shared``), and every layer slices what it needs::

    n = ⌈min(out, in) / r⌉ bases,  Bᵢ ∈ R^{max × r} (frozen),  A ∈ R^{r × min} (frozen, one for all i)
    ΔW = (α / r) · Σᵢ Bᵢ Λᵢ A Γᵢ       Λᵢ = diag(λ[:, i]) (r),  Γᵢ = diag(γ[i]) (min): trainable

so the update has rank up to n·r ≥ min(out, in) while a layer trains only r·n + n·min numbers. ``A`` acts on
the smaller side (the input when in ≤ out, else the output, so ΔW is transposed). λ starts at 0 (ΔW = 0 at
init) and γ at 1 / max(n, min). Bases: Kaiming-uniform (a = √5) in bfloat16 from one CPU generator seeded with
``seed`` (A first, then each Bᵢ), each divided by its standard deviation, as PEFT draws them; they are rebuilt
from the seed on load, never saved. PEFT pairs the flattened (rank, basis) rows of ΛA Γ with the (basis, rank)
columns of B, a fixed permutation of the random bases; kept here so both give the same ΔW. Not included:
PEFT's ``sparse``/``very_sparse`` ternary bases and dropout. On a Conv2d the layer is its out × in·kh·kw view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d


@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA: ⌈min(out,in)/r⌉ shared random rank-r bases per layer, only their diagonal scalings trained."""

    adapter_type: ClassVar[str] = "randlora-core"
    r: int = 32
    alpha: float | None = None  # None: 20·r, PEFT's recommended randlora_alpha
    seed: int = 0  # PEFT's projection_prng_key


def num_bases(out_features: int, in_features: int, r: int) -> int:
    """Enough rank-r bases to reach full rank: ⌈min(out, in) / r⌉."""
    return -(-min(out_features, in_features) // r)


def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


class RandLoraBases(nn.Module):
    """The frozen bases of one adapter, sized for its largest target layer; one object shared by all layers."""

    def __init__(self, r: int, max_dim: int, min_dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = _kaiming_bf16((r, 1, min_dim), g)
        b = torch.cat([_kaiming_bf16((max_dim, 1, r), g) for _ in range(num_bases(max_dim, min_dim, r))], dim=1)
        self.register_buffer("A", a / a.std(), persistent=False)  # (r, 1, min)
        self.register_buffer("B", b / b.std(), persistent=False)  # (max, n, r)


class RandLoraDelta(Delta):
    def __init__(self, base: nn.Module, config: RandLoraConfig) -> None:
        super().__init__(base, config)
        self.min_dim, self.max_dim = sorted((self.out_features, self.in_features))
        self.n = num_bases(self.out_features, self.in_features, config.r)
        self.lam = nn.Parameter(torch.zeros(config.r, self.n))
        self.gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim)))
        self.scale = (config.alpha if config.alpha is not None else 20.0 * config.r) / config.r
        self.shared: RandLoraBases  # set by AdapterModel.add_adapter from build_shared

    @classmethod
    def build_shared(cls, config: RandLoraConfig, layers: dict[str, nn.Module]) -> RandLoraBases:
        out_max = max(weight_2d(m).shape[0] for m in layers.values())
        in_max = max(weight_2d(m).shape[1] for m in layers.values())
        return RandLoraBases(config.r, max(out_max, in_max), min(out_max, in_max), config.seed)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        dtype = self.lam.dtype
        a = self.shared.A[:, :, : self.min_dim].to(dtype)  # (r, 1, min)
        b = self.shared.B[: self.max_dim, : self.n, :].to(dtype)  # (max, n, r)
        scaled_a = (self.lam[:, :, None] * a * self.gamma[None]).flatten(end_dim=1)  # rows (rank, basis)
        b = b.flatten(start_dim=1)  # columns (basis, rank)
        if self.min_dim == self.in_features:
            return self.scale * (b @ scaled_a)
        return self.scale * (scaled_a.T @ b.T)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: RandLoraConfig) -> int:
        n = num_bases(out_features, in_features, config.r)
        return config.r * n + n * min(out_features, in_features)


register("randlora-core", RandLoraConfig, RandLoraDelta, conv=True, identity_at_init=True)

__all__ = ["RandLoraBases", "RandLoraConfig", "RandLoraDelta", "num_bases"]
