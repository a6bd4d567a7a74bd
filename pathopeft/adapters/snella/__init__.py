from pathopeft.adapters.core import register
from pathopeft.adapters.snella.budget import BudgetAllocator, SnellaBudgetCallback
from pathopeft.adapters.snella.config import SnellaConfig
from pathopeft.adapters.snella.layer import SnellaDelta

# ΔW is not zero at init (two random kernels), so no identity claim; the budget competition needs the
# gradients and the global step of a training loop, hence the callback.
register("snella", SnellaConfig, SnellaDelta, conv=True, identity_at_init=False, callback=SnellaBudgetCallback)

__all__ = ["BudgetAllocator", "SnellaBudgetCallback", "SnellaConfig", "SnellaDelta"]
