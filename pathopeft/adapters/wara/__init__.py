from pathopeft.adapters.wara.config import WaraConfig
from pathopeft.adapters.wara.layer import WaraDelta

__all__ = ["WaraConfig", "WaraDelta"]
