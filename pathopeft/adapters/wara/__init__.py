from pathopeft.adapters.core import register
from pathopeft.adapters.wara.config import WaraConfig, WaraSubbandConfig
from pathopeft.adapters.wara.layer import WaraDelta
from pathopeft.adapters.wara.subband import WaraSubbandDelta

register("wara", WaraConfig, WaraDelta, conv=True, identity_at_init=True)
register("wara-subband", WaraSubbandConfig, WaraSubbandDelta, conv=True, identity_at_init=True)

__all__ = ["WaraConfig", "WaraDelta", "WaraSubbandConfig", "WaraSubbandDelta"]
