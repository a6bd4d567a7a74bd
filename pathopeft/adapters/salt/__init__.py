from pathopeft.adapters.core import register
from pathopeft.adapters.salt.config import SaltConfig
from pathopeft.adapters.salt.layer import SaltDelta, salt_loss, salt_regularizer

register("salt", SaltConfig, SaltDelta, conv=True, identity_at_init=True, regularizer=salt_loss)

__all__ = ["SaltConfig", "SaltDelta", "salt_loss", "salt_regularizer"]
