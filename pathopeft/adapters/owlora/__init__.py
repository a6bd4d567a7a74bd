from pathopeft.adapters.owlora.config import OwloraConfig
from pathopeft.adapters.owlora.layer import (
    OwloraDelta,
    collect_inputs,
    max_overlap,
    next_task,
    owlora_deltas,
    protect_current,
    set_active_tasks,
)

__all__ = [
    "OwloraConfig",
    "OwloraDelta",
    "collect_inputs",
    "max_overlap",
    "next_task",
    "owlora_deltas",
    "protect_current",
    "set_active_tasks",
]
