from pathopeft.adapters.salt.config import SaltConfig
from pathopeft.adapters.salt.layer import SaltDelta

__all__ = ["SaltConfig", "SaltDelta"]
