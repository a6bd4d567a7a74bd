"""SLTrain — a low-rank plus a fixed-support sparse update.

Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(arXiv 2406.02214; code andyjm3/SLTrain @ 2335d62: ``splora/splora_linear.py``, ``sparse-lora/sparse_linear.cpp``)::

    W = s · B A + S,      s = α / r,      S = scatter(values, support),   support fixed at init

The support is ⌊δ·m·n⌋ entries drawn uniformly without replacement from all m·n positions (flat, row-major,
sorted) and never changes; only the values train, and their gradient is the dense weight gradient gathered at
the support (the code's custom backward; here autograd through a scatter gives the same). Trainable:
r·(m + n) + ⌊δ·m·n⌋. A Kaiming-uniform, B zero.

The code has no frozen base weight: it *pretrains* W = sBA + S with S's values uniform in ±1/√in (nn.Linear's
bound). ``mode="pretrain"`` is that (the base layer's weight is replaced, so a randomly initialised ViT — all
this project has offline — trains through SLTrain as the paper does); ``mode="adapter"`` (default) fine-tunes
W₀ + sBA + S with S's values starting at zero, so the adapter is the identity at init. Chosen where the code
leaves it: α = r by default (the scripts use α = 32 at r = 128, and 8–16 at larger ranks), δ = 0.03 (every
script but 7B), the support drawn from a generator seeded by ``seed`` and the layer's name, stored in the
adapter file (a buffer), so a reload never depends on an RNG.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, weight_2d


@dataclass
class SltrainConfig(AdapterConfig):
    """SLTrain: ΔW = (alpha/r)·B A + S with a fixed random sparse support of density ``delta``."""

    adapter_type: ClassVar[str] = "sltrain"
    r: int = 8
    alpha: float | None = None  # None: alpha = r
    delta: float = 0.03  # density of S's support (sp_ratio)
    mode: str = "adapter"  # "adapter": W0 + sBA + S (S from 0); "pretrain": W = sBA + S, W0 ignored (the code)
    seed: int = 0
    layer_seed: int | None = None  # set per layer by for_layer (seed and the layer's name)

    def __post_init__(self) -> None:
        if self.mode not in ("adapter", "pretrain"):
            raise ValueError(f"sltrain mode must be 'adapter' or 'pretrain', not {self.mode!r}")
        if not 0 <= self.delta <= 1:
            raise ValueError(f"sltrain delta must be in [0, 1], not {self.delta}")

    def for_layer(self, name: str) -> SltrainConfig:
        return dataclasses.replace(self, layer_seed=self.seed * 1_000_003 + zlib.crc32(name.encode()))


class SltrainDelta(Delta):
    def __init__(self, base: nn.Module, config: SltrainConfig) -> None:
        super().__init__(base, config)
        r, out, inp = config.r, self.out_features, self.in_features
        self.scale = (config.alpha if config.alpha is not None else r) / r
        self.pretrain = config.mode == "pretrain"
        self.A = nn.Parameter(torch.empty(r, inp))
        self.B = nn.Parameter(torch.zeros(out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nnz = int(config.delta * out * inp)
        g = torch.Generator().manual_seed(config.layer_seed if config.layer_seed is not None else config.seed)
        self.register_buffer("support", torch.randperm(out * inp, generator=g)[:nnz].sort().values)
        values = torch.zeros(nnz)
        if self.pretrain:
            bound = 1 / math.sqrt(inp)
            values.uniform_(-bound, bound, generator=g)
        self.values = nn.Parameter(values)

    def sparse(self) -> torch.Tensor:
        s = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return s.scatter(0, self.support, self.values).view(self.out_features, self.in_features)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        dw = self.scale * (self.B @ self.A) + self.sparse()
        if self.pretrain:  # W = sBA + S: the update cancels the frozen weight
            dw = dw - weight_2d(base).detach().to(dw.dtype)
        return dw

    def delta_from_merged(self, base: nn.Module) -> torch.Tensor:
        """Unmerging a pretrain-mode adapter cannot recover the discarded W₀: refuse rather than corrupt it."""
        if self.pretrain:
            raise RuntimeError("sltrain in pretrain mode replaces the weight; it cannot be unmerged")
        return self.delta_weight(base)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SltrainConfig) -> int:
        return config.r * (out_features + in_features) + int(config.delta * out_features * in_features)


register("sltrain", SltrainConfig, SltrainDelta, conv=True, identity_at_init=True)

__all__ = ["SltrainConfig", "SltrainDelta"]
