from pathopeft.adapters.core import register
from pathopeft.adapters.owlora.config import OwloraConfig
from pathopeft.adapters.owlora.layer import (
    OwloraDelta,
    collect_inputs,
    max_overlap,
    next_task,
    orthonormality_penalty,
    owlora_deltas,
    project_gradients,
    protect_current,
    set_active_tasks,
)

# not the identity at init: W is SVD-truncated (99 % energy); zero B keeps that truncated output. protect_inputs
# (opt-in) needs collect_inputs before next_task
register("owlora", OwloraConfig, OwloraDelta, conv=True, identity_at_init=False, needs_data=False)

__all__ = [
    "OwloraConfig",
    "OwloraDelta",
    "collect_inputs",
    "max_overlap",
    "next_task",
    "orthonormality_penalty",
    "owlora_deltas",
    "project_gradients",
    "protect_current",
    "set_active_tasks",
]
