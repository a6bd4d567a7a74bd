from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pathopeft.adapters.core import AdapterConfig


def _check_wavelet(wavelet: str) -> None:
    from pathopeft.adapters.wara.wavelets import lowpass_filter

    lowpass_filter(wavelet)  # unknown wavelet: fail at config time


@dataclass
class WaraConfig(AdapterConfig):
    """WaRA (paper Fig. 1): one rank-``r`` pair shared by the four subbands of a one-level 2-D DWT of the
    layer input, scaled by ``alpha / r`` (``alpha`` defaults to ``r``: scale 1). r·(out + in)/2 parameters."""

    adapter_type: ClassVar[str] = "wara"
    r: int = 8
    wavelet: str = "haar"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"WaraConfig: need r >= 1, got r={self.r}")
        _check_wavelet(self.wavelet)

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        if "level" in d:  # adapter files written before the paper's form became "wara"
            raise ValueError(
                "WaraConfig: this adapter has a 'level', so it is the per-subband design, now named 'wara-subband' "
                "(set adapter_type to 'wara-subband' in its adapter_config.json)"
            )
        return super().from_dict(d)


@dataclass
class WaraSubbandConfig(AdapterConfig):
    """pathopeft's wavelet-subband LoRA (not the paper's WaRA): a rank-``r`` pair per 2-D subband of ΔW
    (1 + 3·level subbands), scaled by ``alpha / r``. 2·r·(out + in) parameters at level 1."""

    adapter_type: ClassVar[str] = "wara-subband"
    r: int = 4
    wavelet: str = "haar"
    level: int = 1
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.level < 1:
            raise ValueError(f"WaraSubbandConfig: need r >= 1 and level >= 1, got r={self.r}, level={self.level}")
        _check_wavelet(self.wavelet)

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r
