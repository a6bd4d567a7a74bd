"""MIL model zoo: ``create_mil_model(name, in_dim, n_classes, **kwargs)``, so configs pick the model by a string.

Registered models (all :class:`~pathopeft.mil.models.base.MILModel`, all with ``self.classifier``):

* ``abmil`` — gated-attention ABMIL (Ilse et al. 2018), :mod:`.abmil`;
* ``transmil`` — TransMIL with Nyström attention and PPEG (Shao et al. 2021), :mod:`.transmil`;
* ``gdat`` — CoMEL's Grouped Double Attention Transformer (Lee et al. 2025), :mod:`.gdat`.

A new model is one module with a :func:`register_mil_model`-decorated class and an import line at the
bottom of this file; the test matrix (``tests/mil/test_models.py``) picks it up from :func:`list_mil_models`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pathopeft.mil.models.base import MILModel, MILOutput, check_bag

M = TypeVar("M", bound=type[MILModel])

_MODELS: dict[str, type[MILModel]] = {}


def register_mil_model(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``create_mil_model(name, ...)``; a name is registered once."""
    key = name.lower()

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, MILModel)):
            raise TypeError(f"register_mil_model({name!r}) expects a MILModel subclass, got {cls!r}")
        if key in _MODELS and _MODELS[key] is not cls:
            raise ValueError(f"MIL model {key!r} is already registered ({_MODELS[key].__qualname__})")
        _MODELS[key] = cls
        return cls

    return deco


def list_mil_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(_MODELS)


def mil_model_class(name: str) -> type[MILModel]:
    """The class registered as ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    try:
        return _MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; known: {sorted(_MODELS)}") from None


def create_mil_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """Build model ``name`` for ``in_dim``-dimensional instance features and ``n_classes`` bag classes.

    ``kwargs`` go to the model's constructor (e.g. ``hidden_dim=256``, ``dropout=0.25``)."""
    return mil_model_class(name)(in_dim=in_dim, n_classes=n_classes, **kwargs)


# Registration happens on import; these come last because the modules use ``register_mil_model``.
from pathopeft.mil.models import abmil, gdat, transmil
from pathopeft.mil.models.abmil import ABMIL
from pathopeft.mil.models.gdat import GDAT
from pathopeft.mil.models.transmil import TransMIL

__all__ = [
    "ABMIL",
    "GDAT",
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
