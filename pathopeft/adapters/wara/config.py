from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pathopeft.adapters.core import AdapterConfig


@dataclass
class WaraConfig(AdapterConfig):
    """WaRA: a rank-``r`` factor pair per 2-D wavelet subband of ΔW (1 + 3·level subbands), scaled by
    ``alpha / r`` (``alpha`` defaults to ``r``: scale 1)."""

    adapter_type: ClassVar[str] = "wara"
    r: int = 4
    wavelet: str = "haar"
    level: int = 1
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.level < 1:
            raise ValueError(f"WaraConfig: need r >= 1 and level >= 1, got r={self.r}, level={self.level}")
        from pathopeft.adapters.wara.wavelets import lowpass_filter

        lowpass_filter(self.wavelet)  # unknown wavelet: fail at config time

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r
