from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class SaltConfig(AdapterConfig):
    """SALT: the top singular values get a trainable scale and shift; the remaining ones a rank-``r_lora``
    update. The top count is ``r`` when given, else ``max(1, int(top_ratio · k))`` of the k singular values
    (official: ``ratio_salt`` 0.1); ``r_lora`` (official 256) is capped at the residual dimension k − top.
    ``init`` is ``"zero"`` (Kaiming X, zero Y: exact identity at init, the SAM2 code path) or ``"normal"``
    (X, Y ~ N(0, 0.01²), the SAM ViT-B code path). ``relu`` is ``"full"`` (ReLU on the whole Σ', as the
    official code: a dense rebuild every step) or ``"singular_values"`` (ReLU on the diagonal only: the update
    stays low-rank and runs in factored form at LoRA-like cost). ``reg_weight`` weighs the official
    regulariser ‖Σ'top − Σtop‖ + ‖XY‖ (:func:`~pathopeft.adapters.salt.layer.salt_regularizer`; 0 as the
    official recipe ships)."""

    adapter_type: ClassVar[str] = "salt"
    r: int | None = None
    top_ratio: float = 0.1
    r_lora: int = 256
    target_modules: str | list[str] = "attn+mlp"  # official: qkv, proj, fc1, fc2 of every block
    init: str = "zero"
    relu: str = "full"
    reg_weight: float = 0.0

    def __post_init__(self) -> None:
        if (self.r is not None and self.r < 0) or self.r_lora < 1:
            raise ValueError(f"SaltConfig: need r >= 0 and r_lora >= 1, got r={self.r}, r_lora={self.r_lora}")
        if not 0 < self.top_ratio <= 1:
            raise ValueError(f"SaltConfig.top_ratio must be in (0, 1], got {self.top_ratio}")
        if self.init not in ("zero", "normal"):
            raise ValueError(f"SaltConfig.init must be 'zero' or 'normal', got {self.init!r}")
        if self.relu not in ("full", "singular_values"):
            raise ValueError(f"SaltConfig.relu must be 'full' or 'singular_values', got {self.relu!r}")

    def ranks(self, k: int) -> tuple[int, int]:
        """(top count, residual LoRA rank) on a layer with ``k`` singular values."""
        top = min(self.r, k) if self.r is not None else max(1, int(k * self.top_ratio))
        return top, max(1, min(self.r_lora, k - top)) if k > top else self.r_lora
