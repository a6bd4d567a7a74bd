"""CoDyRA — continual learning with rank-selective gated LoRA, merged into W at every task boundary.

Lu et al., "Continual Learning with Dynamic Rank-Selective LoRA" (arXiv 2412.01004; code
Artificer-AI-Lab/CoDyRA @ c1691e4: ``loralib/codyra.py`` ``codyra_Linear``, ``models/codyra.py``)::

    y = W₀x + B (g ⊙ A x),      ΔW = B diag(g) A      (no α/r scale: the code's scaling is 1)

The layer is SoRA's gated LoRA (:class:`~pathopeft.adapters.sora.GatedLoraDelta`: A Kaiming-uniform, B zero,
g ~ N(0, 1)) with the code's schedule: the first half of a task's steps dense, then the soft threshold
κ rises linearly to ``kappa_max`` (5e-3 in ``runner_codyra.sh``) over ``levels`` phases, applied after every
optimiser step (the threshold itself, not lr·κ). :func:`next_task` is the code's ``increment_task``: the live
ranks' B diag(g) A is merged into W (zero-gate ranks dropped), then A, B, g are drawn afresh, so the model is
the same function across the boundary and inference never pays for past tasks. As in SoRA, the code's
threshold also zeroes values in [κ, 2κ); this is the plain soft threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdaptedLayer, AdapterConfig, register
from pathopeft.adapters.sora import GatedLoraDelta, GateThreshold, layer_ranks


@dataclass
class CodyraConfig(AdapterConfig):
    """CoDyRA: gated LoRA (no scale) soft-thresholded after a dense half; merged into W at each task end."""

    adapter_type: ClassVar[str] = "codyra"
    r: int = 16
    xi_max: float = 5e-3  # max_kappa of runner_codyra.sh
    levels: int = 50  # lambda_num
    dense_fraction: float = 0.5  # dense_iters


@torch.no_grad()
def next_task(adapter_model: nn.Module) -> int:
    """End a task: merge every CoDyRA layer's live ranks into its base weight and start the next task from
    fresh A, g and B = 0 (outputs unchanged). Returns the number of ranks merged."""
    merged = 0
    for layer in adapter_model.modules():
        if not isinstance(layer, AdaptedLayer) or layer.active is None:
            continue
        d = layer.deltas[layer.active]
        if not isinstance(d, GatedLoraDelta) or not isinstance(d.config, CodyraConfig):
            continue
        w = layer.base_layer.weight
        w.add_(d.delta_weight(layer.base_layer).to(w.dtype).view_as(w))
        merged += d.live_ranks()
        nn.init.kaiming_uniform_(d.A, a=math.sqrt(5))
        d.B.zero_()
        d.gate.normal_()
    return merged


register("codyra", CodyraConfig, GatedLoraDelta, conv=True, identity_at_init=True, callback=GateThreshold,
         layer_ranks=layer_ranks)  # fmt: skip

__all__ = ["CodyraConfig", "next_task"]
