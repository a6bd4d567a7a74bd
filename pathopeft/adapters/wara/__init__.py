from pathopeft.adapters.core import register
from pathopeft.adapters.wara.config import WaraConfig
from pathopeft.adapters.wara.layer import WaraDelta

register("wara", WaraConfig, WaraDelta, conv=True, identity_at_init=True)

__all__ = ["WaraConfig", "WaraDelta"]
