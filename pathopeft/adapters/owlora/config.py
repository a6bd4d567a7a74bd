from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig

PROJECTIONS = ("official", "none")


@dataclass
class OwloraConfig(AdapterConfig):
    """OWLoRA (CoMEL): one weighted LoRA per task, ΔW_t = B_t·diag(s_t)·A_t, kept orthogonal to earlier tasks by
    gradient projection and an orthonormality penalty; the base weights truncated by SVD at creation.

    Defaults are the official ones (CoMEL @ 9fd6679): rank 16 and ``qkv_factor``·16 on layers named ``qkv``
    (``cdatmil_owlora.py`` L248, L320), 99 % energy (L249), projection on both factors and penalty weight 1
    (``cdatmil_ppl_owlora_trainer.py`` L47, L285–313, L369–388). ``protect_inputs`` (off) is pathopeft's
    addition, not CoMEL: each task's A is also restricted to the complement of earlier tasks' principal input
    directions (InfLoRA/GPM-style), up to ``energy`` of their variance and ``max_protected`` of the dims.
    """

    adapter_type: ClassVar[str] = "owlora"
    r: int = 16
    qkv_factor: int = 3  # rank of a layer whose name ends in "qkv": qkv_factor · r (official: 3)
    alpha: float | None = None  # scale α/r of ΔW; None: 1 (the official layers have no network_alpha)
    truncate_energy: float | None = 0.99  # W ← its SVD truncation at creation (after task 0); None: keep W
    projection: str = "official"  # gradient projection against earlier tasks' factors; "none": plain LoRA
    ortho_weight: float = 1.0  # λ of the orthonormality penalty (0: none)
    weighted: bool = True  # the per-rank scales s_t train; False: they stay 1
    protect_inputs: bool = False
    energy: float = 0.95
    max_protected: float = 0.5

    def __post_init__(self) -> None:
        if self.r < 1 or self.qkv_factor < 1:
            raise ValueError(f"OwloraConfig: need r >= 1 and qkv_factor >= 1, got {self.r}, {self.qkv_factor}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"OwloraConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.truncate_energy is not None and not 0 < self.truncate_energy <= 1:
            raise ValueError(f"OwloraConfig.truncate_energy must be in (0, 1] or None, got {self.truncate_energy}")
        if not 0 < self.energy <= 1 or not 0 <= self.max_protected < 1:
            raise ValueError("OwloraConfig: need 0 < energy <= 1 and 0 <= max_protected < 1")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r

    def for_layer(self, name: str) -> OwloraConfig:
        """The official rank rule: ``qkv_factor · r`` on a ``qkv`` layer (instances' and agents' shared q, k, v)."""
        if name.rsplit(".", 1)[-1] == "qkv" and self.qkv_factor != 1:
            return dataclasses.replace(self, r=self.r * self.qkv_factor, qkv_factor=1)
        return self
