from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class SnellaConfig(AdapterConfig):
    """SNELLA: a kernelised low-rank ΔW, sparsified per layer by magnitude, budgets moved across layers.

    Defaults are the released SNELLA recipes (``scripts/fgvc/snella32``): rank 32, a dense start
    (``sparsity`` 0), final mean sparsity 0.3 (``final_sparsity``; the VTAB Camelyon recipe uses 0.76 from a
    0.01 start; ``None`` keeps ``sparsity`` fixed in every layer, SNELL's way), dropout 0.1 on the branch input
    and drop-path 0.1 on its output, the fused qkv split into q, k and v (``split_qkv``). ``kernel``:
    ``"mixed"`` (SNELLA: distance difference + learnable softmax term) or ``"distance"`` (SNELL).
    ``kept_value``: ``"weighted"`` keeps w·|w| (the official code), ``"plain"`` keeps w (the papers' text).
    ``checkpoint`` recomputes the dense ΔW in backward instead of storing it (the memory saving). ``parts`` is
    set per layer (3 on a split qkv) and is 1 in adapter files.
    """

    adapter_type: ClassVar[str] = "snella"
    r: int = 32
    target_modules: str | list[str] = "attn+mlp"
    kernel: str = "mixed"
    sparsity: float = 0.0
    final_sparsity: float | None = 0.3
    kept_value: str = "weighted"
    coef: float = 0.1
    dropout: float = 0.1
    drop_path: float = 0.1
    split_qkv: bool = True
    checkpoint: bool = True
    parts: int = 1

    def __post_init__(self) -> None:
        if self.r < 2 or self.r % 2:
            raise ValueError(f"SnellaConfig.r must be even and >= 2 (two kernels of r/2 dims), got {self.r}")
        if self.kernel not in ("mixed", "distance"):
            raise ValueError(f"SnellaConfig.kernel must be 'mixed' or 'distance', got {self.kernel!r}")
        for key in ("sparsity", "final_sparsity"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"SnellaConfig.{key} must be in [0, 1), got {value}")
        if self.kept_value not in ("weighted", "plain"):
            raise ValueError(f"SnellaConfig.kept_value must be 'weighted' or 'plain', got {self.kept_value!r}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.drop_path < 1.0):
            raise ValueError(
                f"SnellaConfig: dropout and drop_path must be in [0, 1), got {self.dropout}, {self.drop_path}"
            )

    def for_layer(self, name: str) -> SnellaConfig:
        """As the official ViT blocks: a fused ``qkv`` becomes three adapters (q, k, v: own factors, kernel
        normalisation, sparsity and budget share), and ``attn.proj`` gets no input dropout (its drop-path stays)."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "qkv" and self.split_qkv:
            return dataclasses.replace(self, parts=3)
        if name.endswith("attn.proj") and self.dropout:
            return dataclasses.replace(self, dropout=0.0)
        return self
