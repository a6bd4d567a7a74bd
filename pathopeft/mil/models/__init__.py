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

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathopeft.errors import UserError

# the model modules register on import (the order is the listing order)
from pathopeft.mil.models import abmil, gdat, transmil
from pathopeft.mil.models.abmil import ABMIL
from pathopeft.mil.models.base import MIL_MODELS, MILModel, MILOutput, check_bag, register_mil_model
from pathopeft.mil.models.gdat import GDAT, GridGDAT
from pathopeft.mil.models.transmil import TransMIL


class MILWeightsError(UserError, ValueError):
    """A weights file that does not fit the configured MIL model (named in the message)."""


def bag_logits(model: nn.Module, bag: dict[str, Any]) -> torch.Tensor:
    """The bag logits (C,) of a MIL model (or a PEFT/adapter wrapper of one) on one loaded bag, as
    :class:`pathopeft.mil.data.BagDataset` yields it."""
    return model(bag["features"], bag["coords"].float()).bag_logits


@torch.no_grad()
def bag_accuracy(model: nn.Module, bags: list[dict[str, Any]]) -> float:
    """Fraction of ``bags`` whose arg-max bag logit is the label (eval mode; 0 for no bags)."""
    model.eval()
    return sum(int(bag_logits(model, b).argmax()) == int(b["label"]) for b in bags) / max(1, len(bags))


def load_mil_weights(model: MILModel, path: str | os.PathLike[str]) -> None:
    """Load a ``.safetensors`` state dict into ``model``: a plain model's, or the continual runner's
    ``task_<t>/net.safetensors`` (its ``mil.`` prefix stripped, its instance head and BPPL buffer dropped).
    A file of an adapted net (adapters not merged) or of another architecture is refused, naming the file."""
    from pathopeft.adapters.serialization import read_safetensors

    sd = read_safetensors(Path(path))
    if any(k.startswith("mil.") for k in sd):
        sd = {k.removeprefix("mil."): v for k, v in sd.items() if k.startswith("mil.")}
    if any(".deltas." in k or ".base_layer." in k for k in sd):
        raise MILWeightsError(f"{path}: holds an adapted net (adapter weights not merged); pass a file of a "
                              "plain net, e.g. task_0/net.safetensors of a continual run")  # fmt: skip
    own = model.state_dict()
    shapes = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if shapes:
        raise MILWeightsError(f"{path}: tensor shapes do not fit the configured {type(model).__name__} (e.g. "
                              f"{shapes[0]}: {tuple(sd[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}); "
                              "check model and model_kwargs")  # fmt: skip
    if missing or unexpected:
        raise MILWeightsError(f"{path}: does not fit the configured {type(model).__name__} (missing "
                              f"{len(missing)}, unexpected {len(unexpected)} keys, e.g. "
                              f"{(missing + unexpected)[:2]}); check model and model_kwargs")  # fmt: skip
    model.load_state_dict(sd)


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
    "MILWeightsError",
    "TransMIL",
    "abmil",
    "bag_accuracy",
    "bag_logits",
    "check_bag",
    "create_mil_model",
    "gdat",
    "list_mil_models",
    "mil_model_class",
    "register_mil_model",
    "transmil",
]
