"""Block-LoRA — LoRA whose down-projection is one small block shared by every input chunk.

Zhou et al., "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning"
(arXiv 2501.16720; no code released). The paper partitions LoRA's down-projection into sub-matrices along the
input and shares them all ("one head"), so the input chunks are *added* before one small matmul::

    A = [A_s  A_s  …  A_s]  (r × in, n copies of A_s ∈ R^{r × ⌈in/n⌉}, truncated to in)
    ΔW = (α / r) · B A,      y = W₀x + (α / r) · B A_s (Σⱼ xⱼ)      (xⱼ: the n chunks of x)

Trainable r·⌈in/n⌉ + r·out per layer, against LoRA's r·(in + out). Only the abstract was available here, so
the equations are our reading of it, and these choices are ours: n = 8 ("eight arms"); the input split into
n chunks of ⌈in/n⌉, the last zero-padded when n does not divide in; LoRA's init (A_s Kaiming-uniform with
a = √5, B = 0: identity at init) and scale α/r with α = r. On a Conv2d the input is in·kh·kw (the out ×
in·kh·kw view), chunked in PyTorch's flattened (in, kh, kw) order, and applied through the merged weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register


@dataclass
class BlockLoraConfig(AdapterConfig):
    """Block-LoRA: one r × ⌈in/n⌉ down-projection shared by the n input chunks, B (out × r) as in LoRA."""

    adapter_type: ClassVar[str] = "blocklora"
    r: int = 8
    n_blocks: int = 8
    alpha: float | None = None  # None: r (scale 1)


class BlockLoraDelta(Delta):
    def __init__(self, base: nn.Module, config: BlockLoraConfig) -> None:
        super().__init__(base, config)
        self.chunk = -(-self.in_features // config.n_blocks)
        self.A_s = nn.Parameter(torch.empty(config.r, self.chunk))
        nn.init.kaiming_uniform_(self.A_s, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(self.out_features, config.r))
        self.scale = (config.alpha if config.alpha is not None else config.r) / config.r

    def down_projection(self) -> torch.Tensor:
        """The full r × in down-projection [A_s A_s … A_s] (for merging and tests)."""
        return self.A_s.repeat(1, self.config.n_blocks)[:, : self.in_features]

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.scale * (self.B @ self.down_projection())

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not isinstance(base, nn.Linear):
            return super().forward(x, base)
        pad = self.chunk * self.config.n_blocks - x.shape[-1]
        xp = F.pad(x, (0, pad)) if pad else x
        summed = xp.reshape(*xp.shape[:-1], self.config.n_blocks, self.chunk).sum(dim=-2)  # additions
        h = summed.to(self.A_s.dtype) @ self.A_s.T  # the one down-projection matmul
        return base(x) + (self.scale * (h @ self.B.T)).to(x.dtype)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: BlockLoraConfig) -> int:
        return config.r * -(-in_features // config.n_blocks) + config.r * out_features


register("blocklora", BlockLoraConfig, BlockLoraDelta, conv=True, identity_at_init=True)

__all__ = ["BlockLoraConfig", "BlockLoraDelta"]
