from pathopeft.adapters.core import register
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

# zero B at init: the identity; protect_inputs needs each task's layer inputs (collect_inputs) before next_task
register("owlora", OwloraConfig, OwloraDelta, conv=True, identity_at_init=True, needs_data=True)

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
