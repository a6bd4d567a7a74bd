"""MIL model zoo: ``create_mil_model(name, in_dim, n_classes, **kwargs)``, so configs pick the model by a string.

Registered models (all :class:`~pathopeft.mil.models.base.MILModel`, all with ``self.classifier``):

* ``abmil`` — gated-attention ABMIL (Ilse et al. 2018), :mod:`.abmil`;
* ``transmil`` — TransMIL with Nyström attention and PPEG (Shao et al. 2021), :mod:`.transmil`;
* ``gdat`` — CoMEL's Grouped Double Attention Transformer (Lee et al. 2025), the official CDAT encoder, :mod:`.gdat`;
* ``gdat-grid`` — pathopeft's own grid-grouped variant of it (not the paper's), :mod:`.gdat`.

The names live in :data:`MIL_MODELS` (a :class:`pathopeft.registry.Registry`). A new model is one module
whose class carries ``@register_mil_model("name")`` (from :mod:`.base`) plus its import line below; the test
matrix (``tests/mil/test_models.py``) iterates :data:`MIL_MODELS`.
"""

from __future__ import annotations

from typing import Any

# the model modules register on import (the order is the listing order)
from pathopeft.mil.models import abmil, gdat, transmil
from pathopeft.mil.models.abmil import ABMIL
from pathopeft.mil.models.base import MIL_MODELS, MILModel, MILOutput, check_bag, register_mil_model
from pathopeft.mil.models.gdat import GDAT, GridGDAT
from pathopeft.mil.models.transmil import TransMIL


def list_mil_models() -> list[str]:
    """Registered model names, in registration order."""
    return MIL_MODELS.names()


def mil_model_class(name: str) -> type[MILModel]:
    """The class registered as ``name`` (case-insensitive); an ``UnknownPluginError`` (a ``ValueError`` too)
    listing the known names otherwise."""
    return MIL_MODELS.get(name)


def create_mil_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """Build model ``name`` for ``in_dim``-dimensional instance features and ``n_classes`` bag classes.

    ``kwargs`` go to the model's constructor (e.g. ``hidden_dim=256``, ``dropout=0.25``)."""
    return mil_model_class(name)(in_dim=in_dim, n_classes=n_classes, **kwargs)


__all__ = [
    "ABMIL",
    "GDAT",
    "MIL_MODELS",
    "GridGDAT",
    "MILModel",
    "MILOutput",
    "TransMIL",
    "abmil",
    "check_bag",
    "create_mil_model",
    "gdat",
    "list_mil_models",
    "mil_model_class",
    "register_mil_model",
    "transmil",
]
