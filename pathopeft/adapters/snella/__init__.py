from pathopeft.adapters.snella.budget import BudgetAllocator, SnellaBudgetCallback
from pathopeft.adapters.snella.config import SnellaConfig
from pathopeft.adapters.snella.layer import SnellaDelta

__all__ = ["BudgetAllocator", "SnellaBudgetCallback", "SnellaConfig", "SnellaDelta"]
