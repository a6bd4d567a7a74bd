from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class OwloraConfig(AdapterConfig):
    """OWLoRA: one rank-``r`` LoRA per task, each restricted to the orthogonal complement of the earlier
    tasks' subspaces, with a learnable per-task weight. ``protect_inputs`` also protects the principal input
    directions seen in earlier tasks (InfLoRA/GPM-style) up to ``energy`` of their variance and at most
    ``max_protected`` of the input dimensions."""

    adapter_type: ClassVar[str] = "owlora"
    r: int = 8
    alpha: float | None = None
    protect_inputs: bool = True
    energy: float = 0.95
    max_protected: float = 0.5
    orthogonal: bool = True  # False: plain LoRA per task (the ablation / "one LoRA per task" baseline)
    weighted: bool = True  # False: every task's weight stays 1

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"OwloraConfig.r must be >= 1, got {self.r}")
        if not 0 < self.energy <= 1 or not 0 <= self.max_protected < 1:
            raise ValueError("OwloraConfig: need 0 < energy <= 1 and 0 <= max_protected < 1")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r
