from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class SaltConfig(AdapterConfig):
    """SALT: ``r`` top singular values get a trainable scale and shift; the remaining ones a rank-``r_lora``
    update. ``init`` is ``"zero"`` (Kaiming X, zero Y: exact identity at init, the SAM2 code path) or
    ``"normal"`` (X, Y ~ N(0, 0.01²), the SAM ViT-B code path). ``relu`` is ``"full"`` (ReLU on the whole
    Σ', as the official code: a dense rebuild every step) or ``"singular_values"`` (ReLU on the diagonal
    only: the update stays low-rank and runs in factored form at LoRA-like cost)."""

    adapter_type: ClassVar[str] = "salt"
    r: int = 8
    r_lora: int = 8
    init: str = "zero"
    relu: str = "full"

    def __post_init__(self) -> None:
        if self.r < 0 or self.r_lora < 1:
            raise ValueError(f"SaltConfig: need r >= 0 and r_lora >= 1, got r={self.r}, r_lora={self.r_lora}")
        if self.init not in ("zero", "normal"):
            raise ValueError(f"SaltConfig.init must be 'zero' or 'normal', got {self.init!r}")
        if self.relu not in ("full", "singular_values"):
            raise ValueError(f"SaltConfig.relu must be 'full' or 'singular_values', got {self.relu!r}")
