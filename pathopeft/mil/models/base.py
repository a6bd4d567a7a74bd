"""The contract every MIL model keeps, so the CoMEL module, BPPL, the runner and the metrics need not care
which model they drive.

A bag is one slide: ``x`` (N, D) instance features and optionally ``coords`` (N, 2) level-0 top-left tile
coordinates (int or float). Bags are processed one at a time (no padding to the largest bag), so N may be
anything from 1 to 10^5+.

Models register where they are defined, ``@register_mil_model("abmil")`` on the class, into
:data:`MIL_MODELS`; it lives here, beside the contract, so model modules import only this file and the
package ``__init__`` imports them without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from pathopeft.registry import Registry


@dataclass
class MILOutput:
    bag_logits: torch.Tensor  # (C,) unnormalised class scores of the bag
    attention: torch.Tensor  # (N,) non-negative instance weights summing to 1 (heatmaps, BPPL prototypes)
    instance_features: torch.Tensor  # (N, H) per-instance embeddings after the model's encoder
    bag_feature: torch.Tensor  # (H,) the pooled bag embedding fed to the bag classifier


class MILModel(nn.Module):
    """Base class: ``forward(x, coords=None) -> MILOutput``; ``hidden_dim`` is H, ``n_classes`` is C.

    The bag classifier is ``self.classifier`` (an ``nn.Linear(H, C)``) in every model, so continual
    learning code can find and grow or adapt it by name.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = in_dim, n_classes, hidden_dim

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError


M = TypeVar("M", bound=type[MILModel])

#: Every MIL model by name (``create_mil_model("gdat", ...)``), in registration order.
MIL_MODELS: Registry[type[MILModel]] = Registry("MIL model")


def register_mil_model(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``create_mil_model(name, ...)``; a name is registered once."""

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, MILModel)):
            raise TypeError(f"register_mil_model({name!r}) expects a MILModel subclass, got {cls!r}")
        return MIL_MODELS.add(name, cls)

    return deco


def check_bag(x: torch.Tensor, coords: torch.Tensor | None, in_dim: int) -> torch.Tensor:
    """Accept (N, D) or (1, N, D); return (N, D) with a clear error otherwise."""
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ValueError(f"expected a bag of shape (N, {in_dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty bag (N = 0): nothing to classify")
    if coords is not None and (coords.dim() != 2 or coords.shape != (x.shape[0], 2)):
        raise ValueError(f"coords must be (N, 2) = ({x.shape[0]}, 2), got {tuple(coords.shape)}")
    return x
