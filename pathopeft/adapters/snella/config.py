from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class SnellaConfig(AdapterConfig):
    """SNELL/SNELLA: a kernelised low-rank ΔW, sparsified per layer by magnitude.

    ``kernel``: ``"mixed"`` (SNELLA: distance difference + learnable softmax term) or ``"distance"`` (SNELL).
    ``sparsity``: fraction of ΔW entries zeroed in each layer at the start (the budget allocator of
    :mod:`pathopeft.adapters.snella.budget` then moves it per layer). ``kept_value``: ``"weighted"`` keeps
    w·|w| (the official code), ``"plain"`` keeps w (the papers' description). ``checkpoint`` recomputes the
    dense ΔW in backward instead of storing it (the memory saving).
    """

    adapter_type: ClassVar[str] = "snella"
    r: int = 8
    kernel: str = "mixed"
    sparsity: float = 0.9
    kept_value: str = "weighted"
    coef: float = 0.1
    dropout: float = 0.0
    checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.r < 2 or self.r % 2:
            raise ValueError(f"SnellaConfig.r must be even and >= 2 (two kernels of r/2 dims), got {self.r}")
        if self.kernel not in ("mixed", "distance"):
            raise ValueError(f"SnellaConfig.kernel must be 'mixed' or 'distance', got {self.kernel!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SnellaConfig.sparsity must be in [0, 1), got {self.sparsity}")
        if self.kept_value not in ("weighted", "plain"):
            raise ValueError(f"SnellaConfig.kept_value must be 'weighted' or 'plain', got {self.kept_value!r}")
