"""Continual strategies, one module each, registered in :data:`STRATEGIES` (see :mod:`.base` for the hooks).

* ``comel``     — GDAT (or any registered model) + BPPL (trains the attention) + an OWLoRA adapter per later task;
* ``owlora``    — the same without BPPL (ablation);
* ``lora``      — one plain LoRA per later task: the adapter baseline;
* ``finetune``  — keep training the same net (lower bound);
* ``ewc``       — finetune + elastic weight consolidation;
* ``replay``    — finetune + a small buffer of earlier tasks' training bags;
* ``erace``, ``derpp``, ``lwf``, ``agem``, ``inflora`` — CoMEL's official baselines (ER-ACE, DER++, LwF,
  A-GEM, InfLoRA; the official runs use BPPL, here it is off unless ``use_bppl: true``);
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
from pathopeft.mil.strategies import erace
from pathopeft.mil.strategies import derpp
from pathopeft.mil.strategies import lwf
from pathopeft.mil.strategies import agem
from pathopeft.mil.strategies import inflora
from pathopeft.mil.strategies import codyra
from pathopeft.mil.strategies import orthoadapt
from pathopeft.mil.strategies import joint

# isort: on

__all__ = [
    "STRATEGIES",
    "BagSource",
    "Strategy",
    "StrategyStateError",
    "agem",
    "codyra",
    "comel",
    "derpp",
    "erace",
    "ewc",
    "finetune",
    "inflora",
    "joint",
    "lora",
    "lwf",
    "orthoadapt",
    "owlora",
    "replay",
]
