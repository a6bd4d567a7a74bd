from pathopeft.adapters.core import register
from pathopeft.adapters.salt.config import SaltConfig
from pathopeft.adapters.salt.layer import SaltDelta, salt_regularizer

register("salt", SaltConfig, SaltDelta, conv=True, identity_at_init=True)

__all__ = ["SaltConfig", "SaltDelta", "salt_regularizer"]
