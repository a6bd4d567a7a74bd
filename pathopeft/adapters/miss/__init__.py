"""MiSS (Bone) in the adapter core, so it adapts Conv2d too: one r×out block shared by every input chunk.

Kang & Yin, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (arXiv 2409.15371,
first "Bone"); PEFT 0.21 ``tuners/miss/layer.py`` (default ``init_weights=True``), whose Linear path this
matches exactly (tested). The input dimension is cut into chunks of r (the last one shorter when r does not
divide it) and every chunk gets the same trainable block M (r × out, zero at init)::

    ΔW[o, j·r + c] = M[c, o]          (ΔW = [Mᵀ Mᵀ … Mᵀ], truncated to the input width)
    y = W x + Σⱼ (x chunk j) M        (PEFT's forward: the chunks summed, one small matmul)

Trainable r·out per layer. On a Conv2d the input dimension is in·kh·kw (the out × in·kh·kw view), so chunks run
over the flattened kernel in PyTorch's (in, kh, kw) order. PEFT's "bat" and "mini" variants are not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register


@dataclass
class MissConfig(AdapterConfig):
    """MiSS (Bone): one trainable r × out block shared by all r-wide input chunks (r·out per layer)."""

    adapter_type: ClassVar[str] = "miss-core"
    r: int = 64


class MissDelta(Delta):
    def __init__(self, base: nn.Module, config: MissConfig) -> None:
        super().__init__(base, config)
        self.r = config.r
        self.miss_block = nn.Parameter(torch.zeros(config.r, self.out_features))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        blocks = -(-self.in_features // self.r)
        return self.miss_block.T.repeat(1, blocks)[:, : self.in_features]

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not isinstance(base, nn.Linear):
            return super().forward(x, base)
        pad = (-x.shape[-1]) % self.r
        xp = F.pad(x, (0, pad)) if pad else x
        chunks = xp.reshape(*xp.shape[:-1], xp.shape[-1] // self.r, self.r).sum(dim=-2)
        return base(x) + (chunks.to(self.miss_block.dtype) @ self.miss_block).to(x.dtype)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: MissConfig) -> int:
        return config.r * out_features


register("miss-core", MissConfig, MissDelta, conv=True, identity_at_init=True)

__all__ = ["MissConfig", "MissDelta"]
