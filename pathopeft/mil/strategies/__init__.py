"""Continual strategies, one module each, registered in :data:`STRATEGIES` (see :mod:`.base` for the hooks).

* ``comel``     — GDAT (or any registered model) + BPPL instance head + an OWLoRA adapter per later task;
* ``owlora``    — the same without BPPL (ablation);
* ``lora``      — one plain LoRA per later task: the adapter baseline;
* ``finetune``  — keep training the same net (lower bound);
* ``ewc``       — finetune + elastic weight consolidation;
* ``replay``    — finetune + a small buffer of earlier tasks' training bags;
* ``joint``     — one training run on all tasks together (upper bound).

A new strategy is one module here with a ``@STRATEGIES.register(name, **caps)`` subclass of
:class:`Strategy` and an import line below (the order of these lines is the order of ``STRATEGIES.names()``:
CLI help, default comparison); ``tests/mil/test_continual.py`` runs every registered strategy.
"""

from __future__ import annotations

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy, StrategyStateError

# Registration happens on import; these lines' order is the registry's order.
# isort: off
from pathopeft.mil.strategies import comel
from pathopeft.mil.strategies import owlora
from pathopeft.mil.strategies import lora
from pathopeft.mil.strategies import finetune
from pathopeft.mil.strategies import ewc
from pathopeft.mil.strategies import replay
from pathopeft.mil.strategies import joint

# isort: on

__all__ = [
    "STRATEGIES",
    "BagSource",
    "Strategy",
    "StrategyStateError",
    "comel",
    "ewc",
    "finetune",
    "joint",
    "lora",
    "owlora",
    "replay",
]
